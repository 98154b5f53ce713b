"""FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the adapter banks and routers like any other
parameter, the sharded model computes the same loss, aux loss and gradients as the unsharded one, and
its adapter saves (gathered, from one rank) and loads (each rank taking its shard) exactly.

accelerate enables FSDP only on GPU-like devices, so `asymlora train` under FSDP needs a GPU; this test
runs the sharding itself on CPU with two gloo processes, which is what FSDP does underneath.
"""

from __future__ import annotations

import os
import socket
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asymlora import AsymLoraConfig, get_model

fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard


def _build(method: str):
    from tiny_models import tiny_llava

    adapter = {"method": method, "r": 4, "alpha": 8, "tasks": ["a", "b"], "modules_to_save": ["projector"]}
    if method != "asymlora":
        adapter.update(num_experts=2, routing="dense", balance_loss_weight=0.1)
    wrapped = get_model(tiny_llava(), AsymLoraConfig.from_dict(adapter))
    torch.manual_seed(1)
    with torch.no_grad():  # nonzero B, so that A and the router get gradients too
        for name, param in wrapped.named_parameters():
            if "B_bank" in name:
                param.normal_(0, 0.05)
    return wrapped


def _loss_and_grads(wrapped, batch, task_ids):
    out = wrapped(**batch, task_ids=task_ids)
    aux = wrapped.aux_loss
    loss = out.loss + 0.1 * aux
    loss.backward()
    grads = {}
    for name, param in wrapped.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return float(out.loss.detach()), float(aux.detach()), grads


def _save_and_reload(wrapped, rank: int, out_dir: str) -> dict[str, np.ndarray]:
    """Save the sharded adapter both ways Trainer does, wipe it, load it back; returns the reloaded
    trainable tensors, gathered whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import asymlora

    wrapped.save_pretrained(f"{out_dir}/gathered", is_main_process=rank == 0)
    # Trainer under FSDP's FULL_STATE_DICT: accelerate gathers this dict and Trainer._save passes it on.
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        wrapped.save_pretrained(f"{out_dir}/trainer", state_dict=full)
    dist.barrier()
    with torch.no_grad():
        for param in wrapped.trainable_state_dict().values():
            param.zero_()
    asymlora.load(wrapped, f"{out_dir}/gathered")
    reloaded = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().copy()
                for n, p in wrapped.trainable_state_dict().items()}
    return reloaded


def _worker(rank: int, port: int, method: str, queue, out_dir: str) -> None:
    from tiny_models import image_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        wrapped = _build(method)
        for layer in wrapped.base_model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(wrapped.base_model)
        sharded = {n: type(p).__name__ for n, p in wrapped.named_parameters() if p.requires_grad}
        batch = image_batch("llava", batch=2)  # every rank sees the full batch: the mean gradient is its gradient
        loss, aux, grads = _loss_and_grads(wrapped, batch, torch.tensor([0, 1]))
        reloaded = _save_and_reload(wrapped, rank, out_dir)
        if rank == 0:
            queue.put((loss, aux, {n: g.numpy() for n, g in grads.items()}, sharded, reloaded))  # by value
        dist.barrier()  # neither rank tears the group down while the other still uses it
    except BaseException:
        queue.put(f"rank {rank} failed:\n{traceback.format_exc()}")  # fail the test now, not at the timeout
        raise
    finally:
        dist.destroy_process_group()
    # Work done and the group torn down cleanly: leave without the interpreter's teardown, where gloo's
    # threads have once aborted a finished rank in CI ("terminate called without an active exception").
    # An exception above still exits with an error. The queue is flushed first.
    queue.close()
    queue.join_thread()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("method", ["asymlora_moe", "asymlora"])
def test_fully_sharded_adapter_matches_unsharded(method, tmp_path):
    from safetensors.torch import load_file
    from tiny_models import image_batch

    reference = _build(method)
    ref_loss, ref_aux, ref_grads = _loss_and_grads(reference, image_batch("llava", batch=2), torch.tensor([0, 1]))
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_worker, args=(rank, port, method, queue, str(tmp_path))) for rank in range(2)]
    for proc in procs:
        proc.start()
    result = queue.get(timeout=300)  # raises if a rank died without a word
    if isinstance(result, str):
        pytest.fail(result)
    loss, aux, grads, sharded, reloaded = result
    for proc in procs:
        proc.join(timeout=300)
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    adapter = [n for n in sharded if "A_bank" in n or "B_bank" in n or "router" in n]
    assert adapter and all(sharded[n] == "DTensor" for n in adapter)  # sharded, not replicated
    assert loss == pytest.approx(ref_loss, rel=1e-5) and aux == pytest.approx(ref_aux, rel=1e-5, abs=1e-7)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(torch.from_numpy(grads[name]), grad, rtol=1e-4, atol=1e-6, msg=name)
    # The saved adapter holds every trainable tensor whole, identical to the unsharded model's.
    expected = {n: p.detach() for n, p in reference.trainable_state_dict().items()}
    for kind in ("gathered", "trainer"):
        saved = load_file(str(tmp_path / kind / "adapter_model.safetensors"))
        assert saved.keys() == expected.keys(), kind
        for name, value in expected.items():
            assert torch.equal(saved[name], value), (kind, name)
    assert reloaded.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(torch.from_numpy(reloaded[name]), value), name
