"""`asymlora merge`, `asymlora export`, `asymlora params` on a tiny saved LLaVA."""

import pytest
import torch
from tiny_models import image_batch, tiny_llava
from transformers import AutoModelForImageTextToText

import asymlora
from asymlora.cli import main

TASKS = ["vqa", "ocr"]


@pytest.fixture
def saved(tmp_path):
    base = tiny_llava()
    base.save_pretrained(tmp_path / "base")
    model = asymlora.get_model(base, asymlora.AsymLoraConfig(method="asymlora", tasks=TASKS, r=4,
                                                             modules_to_save=["projector"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.B_bank.normal_(std=0.2)
        model.base_model.model.multi_modal_projector.linear_1.bias.add_(0.3)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    batch = image_batch("llava")
    with torch.no_grad():
        expected = model(**batch, task_ids=torch.tensor([1, 1])).logits
    return tmp_path, batch, expected


def test_cli_merge(saved):
    tmp_path, batch, expected = saved
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--task", "ocr",
            "--out", str(out)]
    assert main(args) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    assert main(args) == 2  # refuses to overwrite without --force
    assert main([*args, "--force"]) == 0


def test_cli_export_loads_in_peft(saved):
    from peft import PeftModel

    tmp_path, batch, expected = saved
    out = tmp_path / "peft"
    assert main(["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--task", "ocr", "--out", str(out)]) == 0
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tmp_path / "base"), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_cli_params_and_errors(saved, capsys):
    tmp_path, _, _ = saved
    assert main(["params", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]) == 0
    assert "B_bank" in capsys.readouterr().out
    assert main(["merge", "--model", str(tmp_path / "nope"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--task", "caption", "--out", str(tmp_path / "x")]) == 2
    assert "'caption' is not in tasks" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("merge", "export", "params", "setup"):
        assert command in text
