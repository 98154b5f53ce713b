"""benchmarks/speed.py: the tiny preset writes a complete table, and the loop formulation it compares
against computes exactly what asymlora's fused layers compute (like is compared with like)."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def _load_speed():
    name = "asymlora_bench_speed"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


speed = _load_speed()
TINY = ["--preset", "tiny", "--device", "cpu", "--threads", "1", "--quiet"]


def test_tiny_preset_writes_every_configuration(tmp_path):
    result = speed.main([*TINY, "--iters", "1", "--warmup", "0", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "speed_tiny_cpu.json").read_text())
    assert data["train"] == result["train"]
    assert data["complete"] and data["planned_train_configurations"] == len(data["train"])
    assert "Partial" not in (tmp_path / "speed_tiny_cpu.md").read_text()
    rows = {(r["method"], r["E"], r["impl"]): r for r in data["train"]}
    expected = {("lora", 1, impl) for impl in speed.IMPLS}
    expected |= {(m, e, impl) for m in ("lora_moe", "asymlora", "asymlora_moe") for e in (3, 4, 8)
                 for impl in speed.IMPLS}
    assert set(rows) == expected | {("peft_lora", 1, "peft")}
    assert all(row["ops"] > 0 for row in rows.values())
    assert rows[("asymlora_moe", 3, "fused")]["ops"] > rows[("lora", 1, "fused")]["ops"]  # routers cost ops
    for row in rows.values():  # float32 adapter: parameter, gradient, two AdamW moments
        assert row["train_state_mib"] == pytest.approx(row["trainable"] * 16 / 2**20)
        assert row["saved_act_mib"] > 0
    saved = {key: rows[key]["saved_act_mib"] for key in rows}
    assert saved[("asymlora_moe", 3, "fused")] < saved[("asymlora_moe", 8, "fused")]  # (T, E r) codes, stacked B
    assert saved[("lora", 1, "fused")] < saved[("asymlora_moe", 3, "fused")]
    for row in rows.values():
        assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["trainable"] > 0
        assert row["loss"] == pytest.approx(row["loss"])  # finite
    # Both formulations train the same number of parameters.
    for method, e, _ in expected:
        assert rows[(method, e, "fused")]["trainable"] == rows[(method, e, "loop")]["trainable"]
    env = data["environment"]
    assert env["batch"] == 2 and env["seq"] == 16 and env["layers"] == 2 and env["torch"] == torch.__version__
    infer = {(r["method"], r["E"]): r for r in data["inference"]}
    assert infer[("asymlora", 8)]["merged_ms"] > 0 and infer[("lora", 1)]["merged_vs_base"] > 0
    assert infer[("asymlora_moe", 8)]["merged_ms"] is None  # a router-gated adapter cannot be merged
    # decoding: one token per sample per step with a KV cache, for the same three models
    assert infer[("asymlora_moe", 8)]["decode_unmerged_ms"] > 0 and infer[("asymlora_moe", 8)]["decode_merged_ms"] is None
    assert infer[("asymlora", 8)]["decode_merged_vs_base"] > 0 and infer[("lora", 1)]["decode_tokens"] == 4
    assert any(t["target"].startswith("asymlora_moe E=8 loop") for t in data["targets"])
    md = (tmp_path / "speed_tiny_cpu.md").read_text()
    assert "| asymlora_moe | dense | 8 | 4 | loop |" in md and "merged / base" in md and "saved act MiB" in md
    assert "### Decode latency" in md
    assert any(t["target"] == "asymlora_moe E=3 saved activations + trainable state / lora" for t in data["targets"])
    # Every row but LoRA's is also timed round by round against its reference, in one process; every fused
    # row but PEFT's also against PEFT's LoRA.
    for (method, e, impl), row in rows.items():
        assert (impl == "fused") == ("peft_paired_ratio" in row)
        if impl == "fused":
            assert row["peft_paired_with"] == "peft_lora E=1 peft" and row["peft_paired_rounds"] == 1
            assert row["peft_paired_q1"] <= row["peft_paired_ratio"] <= row["peft_paired_q3"]
        if (method, impl) == ("lora", "fused"):
            assert "paired_ratio" not in row
            continue
        assert row["paired_with"] == ("lora E=1 fused" if impl in ("fused", "peft") else f"{method} E={e} fused")
        assert row["paired_rounds"] == 1 and row["paired_q1"] <= row["paired_ratio"] <= row["paired_q3"]
    assert rows[("peft_lora", 1, "peft")]["trainable"] == rows[("lora", 1, "fused")]["trainable"]
    assert "| peft_lora | - | 1 | 4 | peft |" in md and "paired: step x PEFT LoRA (IQR)" in md
    assert "| asymlora_moe E=3 step / lora step (paired) |" in md
    assert rows[("lora", 1, "fused")]["optimizer"] == speed._optimizer_name(speed.make_optimizer([torch.nn.Parameter(
        torch.zeros(1))]))


def test_no_train_times_inference_only(tmp_path):
    result = speed.main([*TINY, "--iters", "1", "--warmup", "0", "--no-train", "--methods", "asymlora_moe",
                         "--experts", "3", "--decode-tokens", "2", "--out-dir", str(tmp_path)])
    assert result["train"] == [] and result["planned_train_configurations"] == 0
    (row,) = result["inference"]
    assert (row["method"], row["E"], row["decode_tokens"]) == ("asymlora_moe", 3, 2) and row["decode_unmerged_ms"] > 0
    with pytest.raises(SystemExit, match="nothing to time"):
        speed.main([*TINY, "--no-train", "--no-inference"])


def test_matched_budget_runs_each_method_at_the_rank_nearest_loras_parameter_count(tmp_path):
    s = speed.resolve_settings(speed.parse_args([*TINY, "--matched-budget", "--methods", "lora", "asymlora",
                                                 "asymlora_moe", "lora_moe", "--experts", "3", "8"]))
    budget = speed.adapter_parameters("lora", 1, s.r, s)
    assert set(s.ranks) == {f"{m}:{e}" for m in ("asymlora", "asymlora_moe", "lora_moe") for e in (3, 8)}
    for key, r in s.ranks.items():
        method, experts = key.split(":")
        count = {rank: speed.adapter_parameters(method, int(experts), rank, s) for rank in range(1, s.r + 1)}
        assert abs(count[r] - budget) == min(abs(c - budget) for c in count.values())
        assert speed.adapter_config(method, int(experts), s).r == r < s.r  # E heads: a smaller rank
        config = speed.adapter_config(method, int(experts), s)
        assert config.alpha / config.r == s.alpha / s.r  # the same scaling at every rank
    assert s.ranks["asymlora:3"] >= s.ranks["asymlora:8"]
    result = speed.main([*TINY, "--matched-budget", "--iters", "1", "--warmup", "0", "--methods", "lora",
                         "asymlora", "--experts", "3", "--impls", "fused", "--no-paired", "--no-count-ops",
                         "--decode-tokens", "0", "--out-dir", str(tmp_path)])
    rows = {(r["method"], r["E"]): r for r in result["train"]}
    assert rows[("lora", 1)]["r"] == s.r and rows[("asymlora", 3)]["r"] == s.ranks["asymlora:3"]
    assert rows[("lora", 1)]["trainable"] == budget
    assert rows[("asymlora", 3)]["trainable"] == speed.adapter_parameters("asymlora", 3, s.ranks["asymlora:3"], s)
    assert [r["r"] for r in result["inference"]] == [s.r, s.ranks["asymlora:3"]]
    md = (tmp_path / "speed_tiny_cpu_budget.md").read_text()
    assert "ranks matched to LoRA's trainable adapter parameters at r=4" in md
    assert f"| asymlora | task | 3 | {s.ranks['asymlora:3']} | fused |" in md and "not at the same r" in md
    assert not (tmp_path / "speed_tiny_cpu.json").exists()


def test_optimizer_is_the_one_asymlora_train_builds():
    from transformers import Trainer, TrainingArguments

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = speed.make_optimizer([param], lr=1e-3)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir="unused", report_to=[]))
    assert type(optimizer) is cls
    assert optimizer.defaults["lr"] == 1e-3
    assert all(optimizer.defaults[k] == v for k, v in kwargs.items() if k != "lr")  # e.g. fused=True


def test_paired_ratios_come_from_rounds_against_the_reference():
    s = speed.resolve_settings(speed.parse_args([*TINY, "--iters", "5", "--warmup", "1"]))
    row = speed.run_train_config(s, "asymlora_moe", 3, "loop")
    assert row["paired_with"] == "asymlora_moe E=3 fused" and row["paired_rounds"] == 5
    assert row["paired_q1"] <= row["paired_ratio"] <= row["paired_q3"]
    assert row["paired_fwd_bwd_ratio"] > 0
    fused = dict(method="asymlora_moe", E=3, impl="fused", ms=10.0, fwd_bwd_ms=9.0)
    lora = dict(method="lora", E=1, impl="fused", ms=10.0, fwd_bwd_ms=9.0)
    loop = dict(method="asymlora_moe", E=3, impl="loop", ms=30.0, fwd_bwd_ms=27.0, paired_with="asymlora_moe E=3 fused",
                paired_ratio=2.5, paired_q1=2.4, paired_q3=2.6, paired_fwd_bwd_ratio=2.7)
    assert speed._ratio(loop, fused, "step") == (2.5, True) and speed._ratio(loop, fused, "fwd_bwd") == (2.7, True)
    assert speed._ratio(loop, lora, "step") == (3.0, False)  # paired with another reference: the ratio of the medians
    assert speed._ratio(loop, lora, "fwd_bwd") == (3.0, False)
    assert speed._paired_cell(loop) == "2.500 (2.40-2.60)" and speed._paired_cell(fused) == ""
    s_off = speed.resolve_settings(speed.parse_args([*TINY, "--iters", "1", "--warmup", "0", "--no-paired"]))
    assert "paired_ratio" not in speed.run_train_config(s_off, "asymlora_moe", 3, "fused")


def test_saved_activation_bytes_counts_what_backward_keeps():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 4)
    # mm keeps x (for the weight's gradient) and the weight (a parameter: not counted); tanh keeps its output
    assert speed.saved_activation_bytes(lambda: torch.tanh(x @ weight).sum(), [weight]) == (5 * 4 + 5 * 3) * 4
    assert speed.trainable_state_bytes([weight]) == 12 * 4 * 4


@pytest.mark.parametrize("method,experts", [("asymlora_moe", 3), ("asymlora", 3), ("lora_moe", 4), ("lora", 1)])
def test_loop_formulation_matches_fused(method, experts):
    s = speed.resolve_settings(speed.parse_args(TINY))
    base = speed.build_base(s)
    twin = copy.deepcopy(base)
    fused = speed.attach(base, method, experts, "fused", s)
    loop = speed.attach(twin, method, experts, "loop", s)
    assert isinstance(loop, speed.LoopVariant) and loop.names == fused.names
    speed.randomize_b(fused, std=0.2)
    with torch.no_grad():  # routers away from uniform, so the gates matter
        for layer in fused.wrapped.adapter_layers.values():
            if layer.router is not None:
                layer.router.weight.normal_(std=0.5)
    speed.copy_fused_to_loop(fused, loop)
    batch = speed.make_batch(s, experts)
    fused.model.train()
    loop.model.train()
    loss_fused, loss_loop = fused.loss(batch), loop.loss(batch)
    loop.detach()  # loop.base is the plain base model again: the adapters must change the loss
    with torch.no_grad():
        loss_base = loop.base(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert abs(loss_fused.item() - loss_base.item()) > 1e-3
    torch.testing.assert_close(loss_loop, loss_fused, rtol=1e-5, atol=1e-6)
    if method == "asymlora_moe":  # the balance loss is part of both losses
        assert fused.wrapped.aux_loss.item() > 0
    loss_fused.backward()
    loss_loop.backward()
    name = fused.names[0]
    grad_fused = fused.wrapped.adapter_layers[name].B_bank.grad
    grad_loop = torch.stack([lin.weight.grad for lin in loop.layers[name].lora_B])
    torch.testing.assert_close(grad_loop, grad_fused, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("routing,top_k", [("dense", 2), ("topk", 1), ("topk", 2)])
def test_loop_layer_matches_fused_layer_for_every_router(routing, top_k):
    """The loop reference (also layer_speed.py's) computes the fused layer's output, gradients and
    balance-loss inputs, top-k included."""
    from asymlora import AsymLoraConfig, AsymLoraLinear
    from asymlora.routing import RoutingContext

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 12, bias=False).requires_grad_(False)
    spec = AsymLoraConfig(method="asymlora_moe", num_experts=4, routing=routing, top_k=top_k, r=3).layer_spec()
    fused = AsymLoraLinear(base, spec, "layer", adapter_dtype="float32")
    fused.routing_context = RoutingContext()
    context = speed.LoopContext()
    loop = speed.LoopLinear(base, spec, context)
    with torch.no_grad():
        fused.B_bank.normal_(std=0.3)
        fused.router.weight.normal_(std=0.5)
        loop.lora_A[0].weight.copy_(fused.A_bank)
        for e, head in enumerate(loop.lora_B):
            head.weight.copy_(fused.B_bank[e])
        loop.router.weight.copy_(fused.router.weight)
        loop.router.bias.copy_(fused.router.bias)
    x = torch.randn(2, 5, 8)
    context.collecting = True
    fused.routing_context.collecting = True
    out_fused, out_loop = fused(x), loop(x)
    torch.testing.assert_close(out_loop, out_fused)
    assert (out_fused - base(x)).abs().max() > 1e-2  # the adapter and its gates matter
    (_, (probs, dispatch, _, _)), = fused.routing_context.records
    (loop_probs, loop_dispatch), = context.records
    torch.testing.assert_close(loop_probs, probs)
    if dispatch is None:  # dense: the model takes the argmax of every layer's probs at once
        from asymlora.routing import argmax_dispatch

        dispatch = argmax_dispatch(probs)
    torch.testing.assert_close(loop_dispatch, dispatch)
    out_fused.square().sum().backward()
    out_loop.square().sum().backward()
    torch.testing.assert_close(loop.router.weight.grad, fused.router.weight.grad)
    torch.testing.assert_close(torch.stack([h.weight.grad for h in loop.lora_B]), fused.B_bank.grad)


def test_a_run_cut_short_keeps_the_configurations_it_measured(tmp_path, monkeypatch):
    """speed.py writes its files after every configuration, so a time limit loses only the unfinished one."""
    real, calls = speed.run_train_config, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(args[1:4])
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a time limit's signal looks like to the run
        return real(*args, **kwargs)

    monkeypatch.setattr(speed, "run_train_config", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        speed.main([*TINY, "--iters", "1", "--warmup", "0", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "speed_tiny_cpu.json").read_text())
    assert not data["complete"] and data["inference"] == []
    assert [(r["method"], r["E"], r["impl"]) for r in data["train"]] == [tuple(c) for c in calls[:2]]
    assert data["planned_train_configurations"] == 21
    assert "**Partial: 2 of 21 training configurations" in (tmp_path / "speed_tiny_cpu.md").read_text()


def test_compile_times_the_compiled_model_and_trains_as_eager_does(tmp_path):
    """--compile: every configuration's steps run under torch.compile (inductor), the report says so, the
    compiled steps train exactly what the eager steps train (same losses after the same steps), and
    --pair-with-eager times each configuration against itself run eagerly."""
    import torch._dynamo

    argv = [*TINY, "--methods", "lora", "asymlora_moe", "--experts", "3", "--impls", "fused",
            "--no-inference", "--no-count-ops", "--iters", "1"]
    eager = speed.main([*argv, "--no-paired", "--warmup", "2", "--out-dir", str(tmp_path / "eager")])
    torch._dynamo.utils.counters.clear()
    compiled = speed.main([*argv, "--compile", "--pair-with-eager", "--warmup", "0",
                           "--out-dir", str(tmp_path / "compiled")])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # it compiled both configurations
    assert compiled["environment"]["compile"] == "default" and compiled["environment"]["warmup"] == 2
    md = (tmp_path / "compiled" / "speed_tiny_cpu.md").read_text()
    assert "torch.compile" in md and "compiled / eager" in md
    assert "eager (no torch.compile)" in (tmp_path / "eager" / "speed_tiny_cpu.md").read_text()
    for e_row, c_row in zip(eager["train"], compiled["train"], strict=True):
        assert (e_row["method"], e_row["E"]) == (c_row["method"], c_row["E"])
        assert c_row["loss"] == pytest.approx(e_row["loss"], rel=1e-4)
        assert c_row["saved_act_mib"] > 0
        assert c_row["paired_with"] == f"{c_row['method']} E={c_row['E']} fused eager" and c_row["paired_ratio"] > 0
    with pytest.raises(SystemExit, match="--pair-with-eager"):
        speed.main([*argv, "--pair-with-eager", "--out-dir", str(tmp_path / "refused")])


def test_peft_lora_row_is_lora_at_the_same_targets_rank_and_scaling():
    """PEFT's LoRA adapts the modules asymlora's LoRA adapts, with the same r, alpha and dropout: given
    asymlora's A and B it computes the same loss and gradients; its row is paired with both LoRAs."""
    s = speed.resolve_settings(speed.parse_args([*TINY, "--iters", "3", "--warmup", "1"]))
    base = speed.build_base(s)
    twin = copy.deepcopy(base)
    ours = speed.attach(base, "lora", 1, "fused", s)
    peft = speed.attach(twin, "peft_lora", 1, "peft", s)
    assert isinstance(peft, speed.PeftVariant) and peft.names == ours.names
    assert sum(p.numel() for p in peft.trainable()) == sum(p.numel() for p in ours.trainable())
    speed.randomize_b(ours, std=0.2)
    with torch.no_grad():
        for name, layer in ours.wrapped.adapter_layers.items():
            lora = peft.peft_model.base_model.model.get_submodule(name)
            lora.lora_A["default"].weight.copy_(layer.A_bank)
            lora.lora_B["default"].weight.copy_(layer.B_bank[0])
            assert lora.scaling["default"] == layer.scaling
    batch = speed.make_batch(s, 1)
    loss_ours, loss_peft = ours.loss(batch), peft.loss(batch)
    peft.detach()  # the plain base again: the adapter must change the loss
    with torch.no_grad():
        loss_base = twin(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert abs(loss_ours.item() - loss_base.item()) > 1e-3
    torch.testing.assert_close(loss_peft, loss_ours, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in twin.parameters()) and type(twin.get_submodule(ours.names[0])) is torch.nn.Linear
    row = speed.run_train_config(s, "peft_lora", 1, "peft")
    assert (row["impl"], row["routing"], row["r"]) == ("peft", "-", s.r) and row["ms"] > 0
    assert row["paired_with"] == "lora E=1 fused" and row["paired_rounds"] == 3 and "peft_paired_ratio" not in row
    lora_row = speed.run_train_config(s, "lora", 1, "fused")
    assert lora_row["peft_paired_with"] == "peft_lora E=1 peft" and "paired_ratio" not in lora_row
    assert speed._paired_cell(lora_row, "peft_paired").startswith(f"{lora_row['peft_paired_ratio']:.3f} (")
    assert speed.references_of("asymlora", 3, "fused", peft=False) == [speed.LORA_REFERENCE]
