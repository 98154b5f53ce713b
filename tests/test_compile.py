"""torch.compile (what the Trainer's ``torch_compile: true`` does): the adapter layers trace without a graph
break, and a compiled training step gives the eager step's loss and gradients, for every method."""

from __future__ import annotations

import pytest
import torch
from test_model import ALL_CASES, randomize_adapter
from tiny_models import case_id, image_batch, tiny_llava
from train_fixtures import losses, train_setup

import asymlora
from asymlora import AsymLoraConfig
from asymlora.train import TrainConfig, run_training


def adapted(case: dict) -> asymlora.AsymLoraModel:
    torch.manual_seed(0)
    model = asymlora.get_model(tiny_llava(), AsymLoraConfig(r=4, modules_to_save=["projector"], **case))
    randomize_adapter(model)  # non-zero B heads and routers: every term of the update is exercised
    return model.train()


def batch() -> dict:
    # 3 samples x 40 tokens: task routing (E=3) takes the per-sample heads, (E-1) * 40 >= TASK_BMM_MIN_WORK
    return dict(image_batch("llava", batch=3, text_len=40), task_ids=torch.tensor([0, 2, 1]))


def train_step(model: torch.nn.Module, wrapped: asymlora.AsymLoraModel, inputs: dict):
    wrapped.zero_grad()
    loss = model(**inputs).loss + 0.01 * wrapped.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_compiled_training_step_matches_eager_without_a_break_per_layer(case):
    """aot_eager: dynamo and AOTAutograd trace forward and backward (the bank Functions' backward included),
    without inductor's code generation, which is the slow part and not asymlora's. Graph breaks are allowed
    in the wrapper's input checks (task ids to Python ints), not in the adapted layers or the routing, which
    run once per linear layer: a break there would cut the decoder into at least one graph per layer
    (``torch._dynamo.explain(model)(**inputs)`` names where)."""
    model = adapted(case)
    inputs = batch()
    eager_loss, eager_grads = train_step(model, model, inputs)
    torch._dynamo.reset()  # the earlier cases' graphs count toward dynamo's recompile limit of these frames
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    compiled = torch.compile(model, backend=backend)
    for _ in range(2):  # the second step runs the cached graphs
        loss, grads = train_step(compiled, model, inputs)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert 1 <= len(graphs) < len(model.adapter_layers), len(graphs)
    assert any("B_bank" in graph.code for graph in graphs)  # the adapter ran inside a compiled graph


@pytest.mark.slow
@pytest.mark.parametrize("method", ["asymlora", "asymlora_moe"])
def test_trainer_torch_compile_trains_like_eager(tmp_path, method):
    """``training.torch_compile: true`` (inductor) through ``asymlora train``: the same losses as eager."""
    runs = {}
    for compile_ in (False, True):
        values = train_setup(tmp_path, method=method, max_steps=4, save_steps=100, logging_steps=1,
                             torch_compile=compile_)
        out = tmp_path / f"run{int(compile_)}"
        values["training"]["output_dir"] = str(out)
        run_training(TrainConfig.from_dict(values))
        runs[compile_] = losses(out)
    assert len(runs[True]) == 4
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-5)
