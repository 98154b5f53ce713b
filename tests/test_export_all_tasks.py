"""`asymlora export --all-tasks`: every task as a PEFT LoRA, served together by PEFT's mixed-task batch."""

import pytest
import torch
from tiny_models import image_batch, tiny_llava
from transformers import AutoModelForImageTextToText

import asymlora
from asymlora.cli import main

TASKS = ["vqa", "ocr", "caption"]


def _adapter(tmp_path, method="asymlora", projector=True, **extra):
    base = tiny_llava()
    base.save_pretrained(tmp_path / "base")
    config = asymlora.AsymLoraConfig(method=method, tasks=TASKS, r=4, modules_to_save=["projector"] if projector else [],
                                     **extra)
    model = asymlora.get_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.B_bank.normal_(std=0.2)
            layer.A_bank.add_(torch.randn_like(layer.A_bank) * 0.1)
        if projector:
            model.base_model.model.multi_modal_projector.linear_1.bias.add_(0.3)
    model.save_pretrained(tmp_path / "adapter")
    return model.eval()


def _export(tmp_path, out, *extra):
    return main(["export", "--all-tasks", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out), *extra])


@pytest.mark.parametrize("method", ["asymlora", "lora_moe"])
def test_mixed_task_batch_through_peft_matches_asymlora(tmp_path, method):
    from peft import PeftModel

    extra = {"num_experts": len(TASKS), "routing": "task"} if method == "lora_moe" else {}
    model = _adapter(tmp_path, method, **extra)
    out = tmp_path / "served"
    assert _export(tmp_path, out) == 0
    assert {p.name for p in out.iterdir()} == {*TASKS, "base", "README.md"}
    for task in TASKS:  # the projector lives in base/, not in the LoRAs (vLLM ignores modules_to_save)
        assert {p.name for p in (out / task).iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        assert "modules_to_save" not in (out / task / "adapter_config.json").read_text().replace('"modules_to_save": null', "")
    readme = (out / "README.md").read_text()
    assert "vllm serve DIR/base --enable-lora" in readme
    assert "--lora-modules vqa=DIR/vqa ocr=DIR/ocr caption=DIR/caption" in readme
    assert "LoRARequest(" in readme and "adapter_names=" in readme and "load_adapter(" in readme

    batch = image_batch("llava", batch=3)
    names = ["caption", "vqa", "ocr"]
    with torch.no_grad():
        expected = model(**batch, task_ids=model.task_ids_for(names)).logits
    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out / "base"), out / TASKS[0],
                                           adapter_name=TASKS[0])
    for task in TASKS[1:]:
        peft_model.load_adapter(out / task, adapter_name=task)
    peft_model.eval()
    with torch.no_grad():
        got = peft_model(**batch, adapter_names=names).logits
        single = peft_model(**{k: v[:1] for k, v in batch.items()}, adapter_names=["vqa"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(single, got[:1], atol=1e-3)  # the task names route: another task differs


def test_projector_only_merge_is_the_exported_base(tmp_path):
    _adapter(tmp_path)
    assert _export(tmp_path, tmp_path / "served") == 0
    assert main(["merge", "--projector-only", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "projector_base")]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "served" / "base").state_dict()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "projector_base").state_dict()
    original = AutoModelForImageTextToText.from_pretrained(tmp_path / "base").state_dict()
    assert exported.keys() == merged.keys()
    for key in exported:
        assert torch.equal(exported[key], merged[key]), key
    bias = "model.multi_modal_projector.linear_1.bias"
    torch.testing.assert_close(exported[bias], original[bias] + 0.3)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(exported[q], original[q])  # no LoRA folded in


def test_without_modules_to_save_there_is_no_base_dir(tmp_path):
    _adapter(tmp_path, projector=False)
    out = tmp_path / "served"
    assert _export(tmp_path, out) == 0
    assert {p.name for p in out.iterdir()} == {*TASKS, "README.md"}
    assert f"vllm serve {tmp_path / 'base'} --enable-lora" in (out / "README.md").read_text()


@pytest.mark.parametrize("command", [["export", "--all-tasks"], ["export", "--task", "vqa"], ["merge", "--task", "vqa"]])
def test_router_gated_adapter_is_refused_in_one_line(tmp_path, capsys, command):
    _adapter(tmp_path, "asymlora_moe", num_experts=2, routing="dense")
    out = tmp_path / "served"
    capsys.readouterr()
    assert main([*command, "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learned router" in err and "per-token mixture of LoRAs" in err
    assert not out.exists()
