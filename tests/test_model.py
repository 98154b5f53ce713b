"""get_model on tiny random models of the real transformers VLM classes."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILY_FACTORIES, case_id, image_batch, tiny_llama_lm, tiny_llava

import asymlora
from asymlora import AsymLoraConfig, CheckpointError, ConfigError
from asymlora.families import family_for

TASKS = ["vqa", "ocr", "caption"]
ALL_CASES = [
    dict(method="lora"),
    dict(method="asymlora", tasks=TASKS),
    dict(method="asymlora_moe", num_experts=3, routing="dense", tasks=TASKS),
    dict(method="asymlora_moe", num_experts=3, routing="topk", top_k=2, tasks=TASKS),
    dict(method="asymlora_moe", num_experts=3, routing="hybrid", tasks=TASKS),
    dict(method="lora_moe", num_experts=2, routing="dense", tasks=TASKS),
]


def randomize_adapter(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.B_bank.copy_(torch.randn(layer.B_bank.shape, generator=g) * 0.3)
            if layer.router is not None:
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))


@pytest.mark.parametrize("family", list(FAMILY_FACTORIES))
def test_families_inject_language_model_only_and_start_at_base(family):
    base = FAMILY_FACTORIES[family]()
    batch = image_batch(family)
    with torch.no_grad():
        expected = base(**batch).logits
    model = asymlora.get_model(base, AsymLoraConfig(method="asymlora_moe", num_experts=2, r=4, tasks=TASKS,
                                                    modules_to_save=["projector"]))
    fam = family_for(base)
    assert fam.name == {"qwen2_5_vl": "qwen2_vl", "smolvlm": "idefics3"}.get(family, family)
    assert model.adapter_layers and all(fam.part_of(n) == "language_model" for n in model.adapter_layers)
    assert not any(n.endswith("lm_head") for n in model.adapter_layers)
    assert len(model.adapter_layers) == 2 * 7  # q k v o gate up down in each of 2 layers
    model.eval()
    with torch.no_grad():
        out = model(**batch, task_ids=torch.tensor([0, 1])).logits
    assert torch.equal(out, expected)  # zero-initialised B: identical to the base model
    model.train()
    loss = model(**batch).loss + 0.1 * model.aux_loss
    loss.backward()
    trainable = {n for n, p in base.named_parameters() if p.grad is not None}
    projector = fam.projector
    for name, param in base.named_parameters():
        owner_is_adapter = any(k in name for k in ("A_bank", "B_bank", "router"))
        if owner_is_adapter or name.startswith(projector + "."):
            assert param.requires_grad, name
        else:
            assert not param.requires_grad and name not in trainable, name
    assert any("B_bank" in n for n in trainable) and any("router" in n for n in trainable)
    assert any(n.startswith(projector + ".") for n in trainable)


def test_centred_B_init_starts_at_base_model():
    base = FAMILY_FACTORIES["llava"]()
    batch = image_batch("llava")
    with torch.no_grad():
        expected = base(**batch).logits
    model = asymlora.get_model(base, AsymLoraConfig(method="asymlora_moe", num_experts=3, r=4, b_init_std=0.02,
                                                    router_init_std=0.0))
    assert all(layer.B_bank.abs().min() > 0 for layer in model.adapter_layers.values())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-5)


def test_target_parts_and_names():
    base = tiny_llava()
    model = asymlora.get_model(base, AsymLoraConfig(method="lora", target_modules=["q_proj", "v_proj"],
                                                    target_parts=["language_model", "vision_tower"]))
    names = list(model.adapter_layers)
    assert any(".vision_tower." in n for n in names) and any(".language_model." in n for n in names)
    assert all(n.endswith(("q_proj", "v_proj")) for n in names)
    with pytest.raises(ConfigError, match=r"target_modules: 'qkv' matches no nn.Linear.*available names"):
        asymlora.get_model(tiny_llava(), AsymLoraConfig(target_modules=["qkv"]))
    with pytest.raises(ConfigError, match="regex"):
        asymlora.get_model(tiny_llava(), AsymLoraConfig(target_modules=r".*nothing_here"))


def test_task_id_errors():
    model = asymlora.get_model(tiny_llava(), AsymLoraConfig(method="asymlora", tasks=TASKS, r=2))
    batch = image_batch("llava")
    with pytest.raises(ConfigError, match="out of range"):
        model(**batch, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="-1"):
        model(**batch, task_ids=torch.tensor([0, -1]))
    with pytest.raises(asymlora.AsymLoraError, match="needs task_ids"):
        model(**batch)
    ids = model.task_ids_for(["ocr", "caption"])
    assert ids.tolist() == [1, 2]


@pytest.mark.parametrize("method", ["lora", "asymlora"])
def test_single_expert_equals_peft_lora(method):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    ours = asymlora.get_model(tiny_llava(), AsymLoraConfig(method=method, tasks=["only"], r=4, alpha=8,
                                                           target_modules=targets))
    randomize_adapter(ours)
    names = list(ours.adapter_layers)
    peft_model = get_peft_model(tiny_llava(), LoraConfig(r=4, lora_alpha=8, target_modules=names))
    with torch.no_grad():
        for name, layer in ours.adapter_layers.items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.A_bank)
            peft_layer.lora_B["default"].weight.copy_(layer.B_bank[0])
    batch = image_batch("llava")
    ours.train()
    peft_model.train()
    out_ours = ours(**batch, task_ids=torch.tensor([0, 0]))
    out_peft = peft_model(**batch)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, rtol=0, atol=1e-6)
    out_ours.loss.backward()
    out_peft.loss.backward()
    for name, layer in ours.adapter_layers.items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.A_bank.grad, peft_layer.lora_A["default"].weight.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.B_bank.grad[0], peft_layer.lora_B["default"].weight.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("routing", ["dense", "topk", "hybrid"])
def test_aux_loss_keeps_gradient_under_nonreentrant_checkpointing(routing):
    config = AsymLoraConfig(method="asymlora_moe", num_experts=3, routing=routing, top_k=2, tasks=TASKS, r=4)
    batch = image_batch("llava")
    results = []
    for checkpointing in (False, True):
        base = tiny_llava()
        model = asymlora.get_model(base, config)
        randomize_adapter(model)
        if checkpointing:
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24's name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
        model.train()
        out = model(**batch, task_ids=torch.tensor([0, 2]))
        assert model.aux_loss.requires_grad
        model.aux_loss.backward()
        grads = {n: m.router.weight.grad.clone() for n, m in model.adapter_layers.items()}
        assert all(g.abs().sum() > 0 for g in grads.values())
        results.append((float(out.loss), float(model.aux_loss), grads))
    (loss0, aux0, g0), (loss1, aux1, g1) = results
    assert loss0 == pytest.approx(loss1, abs=1e-6) and aux0 == pytest.approx(aux1, abs=1e-6)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-6)
    # Switch loss is E * sum f*P: 1 for a perfectly balanced router, at most E; one term per layer.
    n_layers = len(g0)
    assert n_layers * 1.0 - 1e-4 <= aux0 <= n_layers * 3.0


def test_balance_loss_counts_supervised_and_image_tokens_only():
    model = asymlora.get_model(tiny_llava(), AsymLoraConfig(method="asymlora_moe", num_experts=2, r=2))
    batch = image_batch("llava")
    model.train()
    model(**batch)
    mask = model.routing_context.token_mask
    expected = (batch["labels"] != -100) | (batch["input_ids"] == tiny_llava().config.image_token_id)
    expected &= batch["attention_mask"].bool()
    assert torch.equal(mask, expected) and mask.sum() < mask.numel()


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_save_load_round_trip_is_exact(tmp_path, case):
    config = AsymLoraConfig(r=4, modules_to_save=["projector"], **case)
    model = asymlora.get_model(tiny_llava(), config)
    randomize_adapter(model, seed=3)
    with torch.no_grad():
        model.base_model.model.multi_modal_projector.linear_1.weight.add_(0.5)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    restored = asymlora.load(tiny_llava(), tmp_path / "adapter")
    saved, loaded = model.trainable_state_dict(), restored.trainable_state_dict()
    assert saved.keys() == loaded.keys()
    assert any("router" in k for k in saved) == (case.get("routing") in ("dense", "topk", "hybrid"))
    assert any("multi_modal_projector" in k for k in saved)
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    batch = image_batch("llava")
    model.eval()
    restored.eval()
    ids = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(**batch, task_ids=ids).logits, restored(**batch, task_ids=ids).logits)


def test_save_from_a_given_state_dict(tmp_path):
    """Trainer under FSDP / ZeRO-3 hands save_pretrained a gathered state dict (wrapper-prefixed keys)."""
    model = asymlora.get_model(tiny_llava(), AsymLoraConfig(method="asymlora_moe", r=4, num_experts=2,
                                                            modules_to_save=["projector"]))
    randomize_adapter(model, seed=5)
    given = {k: v.detach().clone() + 1.0 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "given", state_dict=given)
    saved = load_file(tmp_path / "given" / "adapter_model.safetensors")
    assert saved.keys() == model.trainable_state_dict().keys()
    for key, value in saved.items():  # the given tensors, not the model's own
        assert torch.equal(value, given["base_model." + key]), key
    partial = {k: v for k, v in given.items() if "router" not in k}
    with pytest.raises(CheckpointError, match="router.*missing from the state dict"):
        model.save_pretrained(tmp_path / "partial", state_dict=partial)
    with pytest.raises(CheckpointError, match="stage3_gather_16bit_weights_on_model_save"):
        model.save_pretrained(tmp_path / "empty", state_dict={})
    assert not (tmp_path / "partial").exists() and not (tmp_path / "empty").exists()
    model.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()


def test_load_refuses_mismatched_dirs(tmp_path):
    model = asymlora.get_model(tiny_llava(), AsymLoraConfig(method="lora", r=4))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="target modules differ|does not fit"):
        asymlora.load(tiny_llama_lm(), tmp_path / "a")
    other = tiny_llava()
    wrapped = asymlora.get_model(other, AsymLoraConfig(method="lora", r=8))
    with pytest.raises(CheckpointError, match="differs"):
        asymlora.load(wrapped, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("B_bank"))
    tensors[key] = torch.zeros(1, 2, 3)
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="has shape"):
        asymlora.load(tiny_llava(), tmp_path / "a")
    with pytest.raises(CheckpointError, match="missing"):
        asymlora.load(tiny_llava(), tmp_path / "nowhere")
    config = tmp_path / "a" / "adapter_config.json"
    config.write_text(config.read_text(encoding="utf-8").replace('"layers": {', '"layers": {,', 1), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"adapter_config\.json, line \d+, column \d+: not valid JSON"):
        asymlora.load(tiny_llava(), tmp_path / "a")


@pytest.mark.parametrize("case", [dict(method="lora"), dict(method="asymlora", tasks=TASKS),
                                  dict(method="lora_moe", routing="task", tasks=TASKS)],
                         ids=["lora", "asymlora", "lora_moe-task"])
def test_merge_matches_unmerged_and_unmerge_restores(case):
    base = tiny_llava()
    model = asymlora.get_model(base, AsymLoraConfig(r=4, **case))
    randomize_adapter(model)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in model.adapter_layers.items()}
    batch = image_batch("llava")
    task = "ocr" if case["method"] != "lora" else None
    ids = torch.tensor([1, 1])
    model.eval()
    with torch.no_grad():
        expected = model(**batch, task_ids=ids).logits
        model.merge(task=task)
        merged = model(**batch, task_ids=ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    model.unmerge()
    for name, layer in model.adapter_layers.items():
        assert torch.equal(layer.base_layer.weight, originals[name])


def test_merge_refuses_router_gated_layers_and_leaves_model_intact():
    model = asymlora.get_model(tiny_llava(), AsymLoraConfig(
        method="asymlora", tasks=TASKS, r=2, overrides={"mlp": {"method": "asymlora_moe", "routing": "dense"}}))
    before = {n: m.base_layer.weight.detach().clone() for n, m in model.adapter_layers.items()}
    with pytest.raises(NotImplementedError, match="router"):
        model.merge(task="vqa")
    assert all(m.merged_task is None and torch.equal(m.base_layer.weight, before[n])
               for n, m in model.adapter_layers.items())
    with pytest.raises(NotImplementedError):
        model.export_peft("unused", task="vqa")


@pytest.mark.parametrize("case", [dict(method="lora"), dict(method="asymlora", tasks=TASKS)], ids=["lora", "asymlora"])
def test_exported_peft_adapter_reproduces_outputs(tmp_path, case):
    from peft import PeftModel

    config = AsymLoraConfig(r=4, alpha=8, modules_to_save=["projector"],
                            overrides={"self_attn": {"r": 2, "alpha": 6.0}}, **case)
    model = asymlora.get_model(tiny_llava(), config)
    randomize_adapter(model, seed=5)
    with torch.no_grad():
        model.base_model.model.multi_modal_projector.linear_2.bias.add_(0.25)
    model.export_peft(tmp_path / "peft", task="caption" if case["method"] != "lora" else None)
    peft_model = PeftModel.from_pretrained(tiny_llava(), tmp_path / "peft").eval()
    batch = image_batch("llava")
    model.eval()
    with torch.no_grad():
        expected = model(**batch, task_ids=torch.tensor([2, 2])).logits
        got = peft_model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_param_report_counts():
    model = asymlora.get_model(tiny_llava(), AsymLoraConfig(method="asymlora_moe", num_experts=3, r=4,
                                                            modules_to_save=["projector"]))
    report = asymlora.param_report(model)
    a = sum(layer.A_bank.numel() for layer in model.adapter_layers.values())
    b = sum(layer.B_bank.numel() for layer in model.adapter_layers.values())
    router = sum(layer.router.weight.numel() + layer.router.bias.numel() for layer in model.adapter_layers.values())
    projector = sum(p.numel() for p in model.base_model.model.multi_modal_projector.parameters())
    assert report["by_role"] == {"A_bank": a, "B_bank": b, "router": router, "modules_to_save": projector}
    assert report["trainable"] == a + b + router + projector
    assert "language_model.q_proj" in report["by_module_kind"]
    assert "trainable" in asymlora.format_param_report(report)


def test_generate_routes_by_task():
    model = asymlora.get_model(tiny_llama_lm(), AsymLoraConfig(method="asymlora", tasks=TASKS, r=4))
    randomize_adapter(model)
    prompt = torch.randint(1, 100, (2, 5))
    outs = [model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, task_ids=torch.tensor([t, t]))
            for t in range(3)]
    assert all(o.shape == (2, 9) for o in outs)
    one = copy.deepcopy(model)
    one.merge(task="ocr")
    merged = one.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(merged, outs[1])


def test_modules_to_save_only_adapter(tmp_path):
    with pytest.raises(ConfigError, match="needs modules_to_save"):
        AsymLoraConfig(target_modules=[])
    model = asymlora.get_model(tiny_llava(), AsymLoraConfig(method="lora", target_modules=[],
                                                            modules_to_save=["projector"]))
    assert not model.adapter_layers
    trainable = model.trainable_state_dict()
    assert trainable and all("multi_modal_projector" in k for k in trainable)
    model.save_pretrained(tmp_path / "p")
    restored = asymlora.load(tiny_llava(), tmp_path / "p")
    assert all(torch.equal(restored.trainable_state_dict()[k], v) for k, v in trainable.items())


@pytest.mark.parametrize("routing", ["dense", "topk", "hybrid"])
def test_stacked_aux_loss_and_routing_stats_equal_the_per_layer_definitions(routing, monkeypatch):
    """The balance loss and statistics are computed on the layers' router outputs stacked per group of
    layers routing the same tokens; they must equal the Switch loss and the statistics taken layer by
    layer (here with two groups: the vision tower's patches and the language model's tokens)."""
    import asymlora.model as model_module

    config = AsymLoraConfig(method="asymlora_moe", num_experts=3, routing=routing, top_k=2, tasks=TASKS, r=4,
                            target_parts=["language_model", "vision_tower"])
    model = asymlora.get_model(tiny_llava(), config)
    randomize_adapter(model)
    model.train()
    seen: dict = {}
    original = model_module.group_records

    def spy(records):
        seen["records"] = list(records)
        seen["groups"] = original(records)
        return seen["groups"]

    monkeypatch.setattr(model_module, "group_records", spy)
    batch, task_ids = image_batch("llava"), torch.tensor([0, 2])
    with model.collect_routing_stats():
        model(**batch, task_ids=task_ids)
    stats = model.pop_routing_stats()
    records = seen["records"]
    assert len(records) == len(model.adapter_layers) and len(seen["groups"]) == 2

    reference = torch.zeros(())
    for name, (probs, dispatch, mask, tasks) in records:
        chosen = dispatch if dispatch is not None else torch.nn.functional.one_hot(probs.argmax(-1), 3).float()
        weights = mask.float() if mask is not None else torch.ones(probs.shape[0])
        count = weights.sum().clamp(min=1)
        f = (chosen * weights[:, None]).sum(0) / count
        P = (probs * weights[:, None]).sum(0) / count
        reference = reference + 3 * (f * P).sum()
        entry = stats[name]
        torch.testing.assert_close(entry["load"], (chosen * weights[:, None]).sum(0))
        torch.testing.assert_close(entry["tokens"], weights.sum())
        entropy = -(probs * probs.log()).sum(-1)
        torch.testing.assert_close(entry["entropy_sum"], (entropy * weights).sum().detach())
        task_load = torch.zeros(len(TASKS), 3)
        for t in range(probs.shape[0]):
            task_load[tasks[t]] += chosen[t] * weights[t]
        torch.testing.assert_close(entry["task_load"], task_load)
    torch.testing.assert_close(model.aux_loss, reference)
    routers = [layer.router.weight for layer in model.adapter_layers.values()]
    grads = torch.autograd.grad(model.aux_loss, routers, retain_graph=True)
    expected = torch.autograd.grad(reference, routers)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert model.pop_routing_stats() == {}  # popped: the next block starts from zero


def test_per_token_task_ids_are_built_once_per_forward_and_follow_in_place_changes(monkeypatch):
    import asymlora.model as model_module

    config = AsymLoraConfig(method="asymlora_moe", num_experts=3, routing="hybrid", tasks=TASKS, r=4)
    model = asymlora.get_model(tiny_llava(), config)
    randomize_adapter(model)
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.task_bias.normal_(std=2.0)  # the task prior matters
    model.eval()
    seen = []
    original = model_module.group_records
    monkeypatch.setattr(model_module, "group_records", lambda records: seen.append(records) or original(records))
    batch = image_batch("llava")
    task_ids = torch.tensor([0, 2])
    with model.collect_routing_stats():
        first = model(**batch, task_ids=task_ids).logits
        task_ids[:] = torch.tensor([1, 1])  # the same tensor, changed in place
        second = model(**batch, task_ids=task_ids).logits
        fresh = model(**batch, task_ids=torch.tensor([1, 1])).logits
    torch.testing.assert_close(second, fresh)
    assert (first - second).abs().max() > 1e-4
    token_ids = {id(record[3]) for _, record in seen[0]}
    assert len(token_ids) == 1  # every layer of the forward routed with one shared per-token tensor


def _half_batch(dtype):
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in image_batch("llava", batch=2).items()}


def test_projector_trains_in_float32_inside_a_bf16_model():
    """A bf16 projector loses most AdamW steps of a small learning rate to rounding (the LLaVA recipe's
    projector lr is 2e-5); modules_to_save train in the adapter's dtype and the model around them keeps its."""
    from asymlora.default_model import find_projector

    config = {"method": "lora", "r": 4, "alpha": 8, "modules_to_save": ["projector"]}
    changed = {}
    for adapter_dtype in ("float32", "auto"):
        torch.manual_seed(0)
        model = tiny_llava().to(torch.bfloat16)
        wrapped = asymlora.get_model(model, AsymLoraConfig.from_dict({**config, "adapter_dtype": adapter_dtype}))
        projector = find_projector(model)
        assert {p.dtype for p in projector.parameters()} == {
            torch.float32 if adapter_dtype == "float32" else torch.bfloat16}
        before = [p.detach().clone() for p in projector.parameters()]
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=2e-5)
        batch = _half_batch(torch.bfloat16)
        for autocast in (True, False, True):  # with the Trainer's autocast and without (plain bf16)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = wrapped(**batch)
            assert out.logits.dtype == torch.bfloat16
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed[adapter_dtype] = (sum(int((p.detach() != b).sum()) for p, b in zip(projector.parameters(), before))
                                  / sum(b.numel() for b in before))
    assert changed["float32"] == 1.0
    assert changed["auto"] < 0.9  # measured 0.34: two thirds of the bf16 updates rounded away


def test_fp16_loss_scaling_trains_the_projector_and_adapter():
    """fp16 mixed precision (autocast + GradScaler, what the Trainer does with fp16 on a GPU) refuses fp16
    gradients ("Attempting to unscale FP16 gradients"): in an fp16 model every trainable tensor is float32."""
    torch.manual_seed(0)
    model = tiny_llava().to(torch.float16)
    wrapped = asymlora.get_model(model, AsymLoraConfig.from_dict(
        {"method": "asymlora_moe", "num_experts": 2, "r": 4, "alpha": 8, "modules_to_save": ["projector"]}))
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    batch = _half_batch(torch.float16)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            out = wrapped(**batch)
            loss = out.loss + 0.01 * wrapped.aux_loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # raises on fp16 gradients
        scaler.update()
        optimizer.zero_grad()
    assert torch.isfinite(out.loss)
    moved = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
    assert any("multi_modal_projector" in n for n in moved) and any("A_bank" in n for n in moved)
