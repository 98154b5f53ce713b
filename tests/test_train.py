"""End-to-end training on a tiny random LLaVA: loss, logs, checkpoints, exact resume, DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import launch_two_processes, log_history, losses, peer_format_mixture, train_setup

import asymlora
from asymlora.errors import ConfigError
from asymlora.tiny import tiny_llava
from asymlora.train import TrainConfig, run_training

TESTS = Path(__file__).parent


def test_train_decreases_loss_and_logs_per_task(tmp_path):
    values = train_setup(tmp_path, max_steps=24, save_steps=100)
    out = run_training(TrainConfig.from_dict(values))
    logs = [e for e in log_history(out) if "loss" in e]
    assert logs[-1]["loss"] < logs[0]["loss"]
    for key in ("loss_color", "loss_isred", "aux_loss", "router_entropy", "expert_load_0", "expert_load_1"):
        assert all(key in entry for entry in logs), key
    assert logs[0]["learning_rate"] == pytest.approx(5e-3)
    assert (out / "adapter_model.safetensors").is_file() and (out / "train_config.yaml").is_file()
    model = asymlora.load(tiny_llava(), out)
    assert model.tasks == ["color", "isred"]


@pytest.mark.parametrize("fmt", ["swift", "registry", "from_record"])
def test_peer_data_formats_train(tmp_path, fmt):
    """ms-swift records, a LLaMA-Factory dataset_info.json and records naming their own task train end to end:
    the samples equal those of the LLaVA files, and the adapter routes by the two tasks."""
    from asymlora.data import load_mixture

    values = train_setup(tmp_path, max_steps=24, save_steps=100)
    reference = load_mixture(values["data"]["mixture"]).load()
    values["data"]["mixture"] = peer_format_mixture(tmp_path / "data", fmt)
    mixture = load_mixture(values["data"]["mixture"])
    assert mixture.tasks == ["color", "isred"]
    samples = sorted(mixture.load(), key=lambda s: s.id)
    assert [(s.messages, s.images, s.task) for s in samples] == \
        [(s.messages, s.images, s.task) for s in sorted(reference, key=lambda s: s.id)]
    out = run_training(TrainConfig.from_dict(values))
    logs = [e for e in log_history(out) if "loss" in e]
    assert logs[-1]["loss"] < logs[0]["loss"] and all("loss_color" in e and "loss_isred" in e for e in logs)
    assert asymlora.load(tiny_llava(), out).tasks == ["color", "isred"]


def test_checkpoint_holds_every_trainable_tensor(tmp_path):
    values = train_setup(tmp_path, max_steps=6, save_steps=6)
    out = run_training(TrainConfig.from_dict(values))
    tensors = load_file(out / "checkpoint-6" / "adapter_model.safetensors")
    kinds = {k.rsplit(".", 1)[-1] for k in tensors}
    assert {"A_bank", "B_bank"} <= kinds
    assert any(".router." in k for k in tensors) and any("multi_modal_projector" in k for k in tensors)
    assert (out / "checkpoint-6" / "optimizer.pt").is_file() and (out / "checkpoint-6" / "scheduler.pt").is_file()


def _trained_groups(tmp_path, **top_level) -> tuple[dict[float, int], list[str]]:
    """Train 2 steps with the given top-level config keys; (tensors per learning rate in the saved
    optimizer, the trainable parameter names)."""
    values = train_setup(tmp_path, max_steps=2, save_steps=2)  # adapter 5e-3, projector 1e-3
    values.update(top_level)
    out = run_training(TrainConfig.from_dict(values))
    groups = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["param_groups"]
    model = asymlora.load(tiny_llava(), out)
    names = [n for n, p in model.base_model.named_parameters() if p.requires_grad]
    by_lr: dict[float, int] = {}
    for group in groups:
        by_lr[group["lr"]] = by_lr.get(group["lr"], 0) + len(group["params"])
    assert groups[0]["lr"] == 5e-3  # the adapter (A) group comes first: it is the one the Trainer logs
    return by_lr, names


def test_optimizer_groups_give_routers_and_projector_their_learning_rates(tmp_path):
    by_lr, names = _trained_groups(tmp_path, router_lr=2e-2)
    routers = sum(".router." in n for n in names)
    projector = sum(n.startswith("model.multi_modal_projector.") for n in names)
    assert routers and projector
    assert by_lr == {5e-3: len(names) - routers - projector, 2e-2: routers, 1e-3: projector}


def test_loraplus_lr_ratio_gives_the_B_banks_their_own_rate(tmp_path):
    by_lr, names = _trained_groups(tmp_path, loraplus_lr_ratio=4.0)  # B at 4 x 5e-3
    B = sum(n.endswith(".B_bank") for n in names)
    projector = sum(n.startswith("model.multi_modal_projector.") for n in names)
    assert B and projector
    assert by_lr == {2e-2: B, 1e-3: projector, 5e-3: len(names) - B - projector}


def test_bf16_model_trains_a_float32_projector_and_fp16_on_cpu_warns(tmp_path):
    """model.dtype bfloat16 with training.bf16 (the LLaVA-7B recipe's setting, at its projector lr 2e-5):
    every projector weight moves and is saved in float32; training.fp16 on CPU says that it does nothing."""
    from asymlora.default_model import find_projector

    values = train_setup(tmp_path, max_steps=2, save_steps=100, bf16=True, logging_steps=1)
    values["model"]["dtype"] = "bfloat16"
    values["projector_lr"] = 2e-5
    out = run_training(TrainConfig.from_dict(values))
    start = {f"model.multi_modal_projector.{n}": p for n, p in find_projector(tiny_llava()).named_parameters()}
    saved = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "multi_modal_projector" in k}
    assert saved.keys() == start.keys()
    for name, value in saved.items():
        assert value.dtype == torch.float32
        assert (value != start[name]).all(), name  # bf16 weights kept about a third of these steps
    logged = losses(out)
    assert len(logged) == 2 and all(0 < loss < 20 for loss in logged)

    values = train_setup(tmp_path, max_steps=1, save_steps=100, fp16=True, output_dir=str(tmp_path / "fp16"))
    with pytest.warns(UserWarning, match="training.fp16 has no effect on cpu"):
        run_training(TrainConfig.from_dict(values))


def test_sample_average_is_the_global_batch_mean_across_accumulation_steps(tmp_path):
    """loss_average: samples gives each sample's token mean the same weight; with gradient accumulation the
    mean is over the whole accumulated batch, so 2 x 2 accumulated equals one batch of 4. The tasks'
    answers differ in length, so the sample mean is not the token mean."""
    runs = {}
    for name, average, batch, accumulation in (("samples", "samples", 4, 1), ("samples_acc", "samples", 2, 2),
                                               ("tokens", "tokens", 4, 1)):
        # task routing: no balance loss, which is a per-micro-batch statistic and would differ
        values = train_setup(tmp_path, method="asymlora", max_steps=4, save_steps=100, logging_steps=1,
                             long_colors=True, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation)
        values["training"]["output_dir"] = str(tmp_path / name)
        values["loss_average"] = average
        run_training(TrainConfig.from_dict(values))
        runs[name] = losses(tmp_path / name)
    assert len(runs["samples"]) == 4
    assert runs["samples_acc"] == pytest.approx(runs["samples"], rel=1e-4, abs=1e-5)
    # The same first batch, weighted otherwise: near the token mean at init (every token's loss is about
    # log(vocab)), but not equal. A loss divided by the wrong count would be far off.
    assert runs["samples"][0] == pytest.approx(runs["tokens"][0], rel=0.05)
    assert abs(runs["tokens"][0] - runs["samples"][0]) > 1e-3
    a, b, t = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("samples", "samples_acc", "tokens"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    moved = max((t[key] - a[key]).abs().max().item() for key in a if key.endswith("B_bank"))
    noise = max((b[key] - a[key]).abs().max().item() for key in a if key.endswith("B_bank"))
    assert moved > 100 * noise


KILL_AFTER_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import yaml
from transformers import TrainerCallback
from asymlora.train import TrainConfig, run_training

class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step == {kill_step}:
            os.kill(os.getpid(), signal.SIGKILL)

config = TrainConfig.from_dict(yaml.safe_load(open({config!r})))
run_training(config, callbacks=[Kill()])
"""


def assert_identical_adapters(a: Path, b: Path) -> list[str]:
    """Assert that two runs saved the same tensors, bit for bit; returns their keys."""
    first = load_file(a / "adapter_model.safetensors")
    second = load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    return list(first)


def test_resume_after_sigkill_is_exact(tmp_path):
    steps = 12
    full = train_setup(tmp_path, max_steps=steps, save_steps=6)
    full["training"]["output_dir"] = str(tmp_path / "full")
    run_training(TrainConfig.from_dict(full))
    killed = train_setup(tmp_path, max_steps=steps, save_steps=6)
    killed["training"]["output_dir"] = str(tmp_path / "killed")
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(killed))
    script = KILL_AFTER_SAVE.format(tests=str(TESTS), kill_step=6, config=str(config_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-6").is_dir() and not (tmp_path / "killed" / "checkpoint-12").exists()
    killed["resume"] = True
    run_training(TrainConfig.from_dict(killed))
    assert_identical_adapters(tmp_path / "full", tmp_path / "killed")


def test_same_seed_repeats_a_task_routed_run_bit_for_bit(tmp_path):
    """Two task-routed AsymLoRA runs of one config and seed end in identical tensors: any drift between
    retrainings comes from a change of code (e.g. the float order of the bank's backward), not the run."""
    outs = []
    for name in ("first", "second"):
        values = train_setup(tmp_path, method="asymlora", max_steps=6, save_steps=100)
        values["training"]["output_dir"] = str(tmp_path / name)
        outs.append(run_training(TrainConfig.from_dict(values)))
    assert any("B_bank" in key for key in assert_identical_adapters(*outs))


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    values = train_setup(tmp_path, max_steps=12, save_steps=4, learning_rate=1e38, max_grad_norm=0)
    with pytest.raises(asymlora.AsymLoraError, match="newest checkpoint whose tensors are all finite"):
        run_training(TrainConfig.from_dict(values))


def test_two_process_ddp_matches_single_process(tmp_path):
    single = train_setup(tmp_path, method="asymlora", max_steps=6, save_steps=100, per_device_train_batch_size=4,
                         logging_steps=1)
    single["training"]["output_dir"] = str(tmp_path / "single")
    run_training(TrainConfig.from_dict(single))
    ddp = train_setup(tmp_path, method="asymlora", max_steps=6, save_steps=100, per_device_train_batch_size=2,
                      logging_steps=1)
    ddp["training"]["output_dir"] = str(tmp_path / "ddp")
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(ddp))
    launch_two_processes(config_path)
    one = losses(tmp_path / "single")
    two = losses(tmp_path / "ddp")
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-3, abs=1e-4)


def test_fsdp_on_cpu_is_refused_alone_and_warned_under_two_processes(tmp_path):
    """accelerate enables FSDP on GPUs only: one process is refused with the field named, and two CPU
    processes, which accelerate silently runs as DDP, say so."""
    values = train_setup(tmp_path, max_steps=1, save_steps=100, fsdp="full_shard")
    with pytest.raises(ConfigError, match=r"training\.fsdp: FSDP shards the model across processes"):
        run_training(TrainConfig.from_dict(values))
    config_path = tmp_path / "fsdp.yaml"
    config_path.write_text(yaml.safe_dump(values))
    proc = launch_two_processes(config_path)
    assert "this run on cpu is plain DDP" in proc.stderr


def test_cli_tiny_config_on_builtin_data(tmp_path, isolated_cache):
    """README: `asymlora data build ...` then `asymlora train configs/tiny.yaml` (real built-in data)."""
    from asymlora.assets import locate
    from asymlora.cli import main

    if locate("easyvqa") is None:
        pytest.skip("easy-VQA is not installed: asymlora setup --only easyvqa")
    assert main(["data", "build", "--only", "easyvqa", "ocr", "--max-per-split", "64"]) == 0
    out = tmp_path / "run"
    config = Path(__file__).parent.parent / "configs" / "tiny.yaml"
    assert main(["train", str(config), f"training.output_dir={out}"]) == 0
    history = log_history(out)
    train_logs = [e for e in history if "loss" in e]
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    assert all("loss_easyvqa" in e and "loss_ocr" in e for e in train_logs)
    assert any("eval_loss" in e for e in history)
    assert list((out / "runs").glob("*/events.out.tfevents.*")) or list(out.glob("**/events.out.tfevents.*"))
    assert (out / "checkpoint-20" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("finished", [True, False])
def test_cli_ends_the_process_group_it_ran_under(finished, tmp_path):
    """`asymlora train` destroys the process group when it ends (after a barrier when it finished), rather
    than leaving the gloo threads to interpreter teardown; with no group it does nothing."""
    import torch.distributed as dist

    from asymlora.train.distributed import end_processes as _end_processes

    assert _end_processes(finished) is False  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        assert _end_processes(finished) is True
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Exited(Exception):
    pass


@pytest.mark.parametrize("outcome", ["finished", "non-finite loss", "no group"])
def test_cli_rank_exits_before_interpreter_teardown(outcome, tmp_path, monkeypatch, capsys):
    """A rank of a distributed `asymlora train` ends its group, flushes, and leaves by os._exit with the
    run's exit code (interpreter finalization is where gloo's threads aborted finished runs); a run
    without a group returns normally."""
    import argparse

    import torch.distributed as dist

    import asymlora.train as train_module
    import asymlora.train.distributed as distributed_module
    from asymlora.commands.train import _cli_train
    from asymlora.errors import NonFiniteLossError

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_setup(tmp_path)))
    trained = []

    def training(config, resume=None):  # what the CLI runs, reduced to its outcome
        trained.append(config.training["output_dir"])
        if outcome == "non-finite loss":
            raise NonFiniteLossError("loss is nan at step 3")

    exits = []

    def exit_now(code):
        exits.append(code)
        raise _Exited

    monkeypatch.setattr(train_module, "run_training", training)
    monkeypatch.setattr(distributed_module.os, "_exit", exit_now)
    args = argparse.Namespace(config=str(config), overrides=[], resume=None)
    if outcome == "no group":
        assert _cli_train(args) == 0 and exits == [] and trained
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(_Exited):
            _cli_train(args)
        assert exits == [0 if outcome == "finished" else 1] and trained
        assert not dist.is_initialized()
        if outcome == "non-finite loss":
            assert "loss is nan at step 3" in capsys.readouterr().out
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
