"""A quantized base (QLoRA, bitsandbytes on CPU): config validation, layers over Linear4bit/Linear8bitLt,
training, exact save/load, export, and merge (refused, or dequantized)."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import image_batch, save_tiny_llava_qlora
from train_fixtures import train_setup

import asymlora
from asymlora.cli import main
from asymlora.errors import ConfigError
from asymlora.quantization import check_quantization, is_quantized_layer, parse_quantization
from asymlora.train.config import TrainConfig

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install 'asymlora[qlora]')")


@pytest.mark.parametrize("value, key", [
    ({"bits": 3}, "model.quantization.bits"),
    ({"quant_type": "nf4"}, "model.quantization.bits"),
    ({"bits": 4, "quant_type": "int4"}, "model.quantization.quant_type"),
    ({"bits": 4, "compute_dtype": "float64"}, "model.quantization.compute_dtype"),
    ({"bits": 4, "double_quant": "yes"}, "model.quantization.double_quant"),
    ({"bits": 4, "group": 64}, "model.quantization.group"),
    ("four", "model.quantization"),
])
def test_bad_quantization_names_the_key(value, key):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model": {"path": "tiny", "quantization": value}}, source="x.yaml")
    message = str(err.value)
    assert message.startswith(f"x.yaml: {key}:") and "\n" not in message


def test_quantization_values():
    assert check_quantization(None) is None
    assert check_quantization(4) == {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32", "double_quant": False}
    assert parse_quantization("none") is None
    assert parse_quantization("8")["bits"] == 8
    assert parse_quantization('{"bits": 4, "quant_type": "fp4", "double_quant": true}') == {
        "bits": 4, "quant_type": "fp4", "compute_dtype": "float32", "double_quant": True}
    with pytest.raises(ConfigError, match=r"^--quantization: quantization.bits: 5"):
        parse_quantization("5")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "model"
    save_tiny_llava_qlora(out)
    return out


def _quantized(model_dir, bits, dtype=None):
    from asymlora.loading import load_base_model

    return load_base_model(model_dir, dtype=dtype, quantization=check_quantization(bits))


def _no_cpu_repacking(model):
    """bitsandbytes repacks 4-bit weights (with bfloat16 scales) on the first no-grad forward in eval mode on
    CPUs with AVX512-BF16; training mode on its layers keeps the float32 dequantization path."""
    for module in model.modules():
        if is_quantized_layer(module):
            module.train()


@needs_bnb
@pytest.mark.parametrize("bits, cls", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_layer_wraps_quantized_linear(model_dir, bits, cls):
    base = _quantized(model_dir, bits)
    model = asymlora.get_model(base, asymlora.AsymLoraConfig(method="asymlora", tasks=["a", "b"], r=4, dropout=0.0))
    name = "model.language_model.layers.0.self_attn.q_proj"
    layer = model.adapter_layers[name]
    assert type(layer.base_layer).__name__ == cls
    assert base.model.multi_modal_projector.linear_1.weight.is_floating_point()  # not quantized
    torch.manual_seed(0)
    with torch.no_grad():
        layer.B_bank.normal_(std=0.5)
    layer.routing_context.task_ids = torch.tensor([1, 0])
    x = torch.randn(2, 3, layer.in_features)
    out = layer(x)
    with torch.no_grad():
        expected = layer.base_layer(x) + layer.scaling * x @ layer.A_bank.t() @ layer.B_bank[torch.tensor([1, 0])].transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    assert layer.A_bank.grad.abs().sum() > 0 and layer.B_bank.grad.abs().sum() > 0


@needs_bnb
def test_prepare_keeps_float_params_in_float32(model_dir):
    from asymlora.quantization import prepare_for_kbit_training

    base = _quantized(model_dir, 4, dtype=torch.bfloat16)
    norm = base.model.language_model.norm.weight
    assert norm.dtype == torch.bfloat16
    prepare_for_kbit_training(base, gradient_checkpointing=True)
    assert base.model.language_model.norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in base.parameters())
    embeds = base.get_input_embeddings()(torch.tensor([[5, 6]]))
    assert embeds.requires_grad  # checkpointed blocks of frozen weights still pass gradients to the adapters


@needs_bnb
def test_4bit_base_trains_saves_reloads_exports_and_merges(model_dir, tmp_path, capsys):
    config = train_setup(tmp_path, method="asymlora", max_steps=4, save_steps=100)
    config["model"] = {"path": str(model_dir), "quantization": {"bits": 4}}
    config["adapter"]["dropout"] = 0.0
    run = asymlora.train.run_training(TrainConfig.from_dict(config))
    manifest = json.loads((run / "adapter_config.json").read_text())
    assert manifest["base_model"]["quantization"]["bits"] == 4
    saved = load_file(str(run / "adapter_model.safetensors"))
    assert any(k.endswith("B_bank") and v.abs().sum() > 0 for k, v in saved.items())  # the B heads trained

    model = asymlora.load(_quantized(model_dir, 4), run, is_trainable=False)
    name = next(iter(model.adapter_layers))
    assert type(model.adapter_layers[name].base_layer).__name__ == "Linear4bit"
    for key, tensor in model.trainable_state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    _no_cpu_repacking(model)
    batch = image_batch("llava")
    with torch.no_grad():
        expected = model(**batch, task_ids=model.task_ids_for(["isred", "isred"])).logits

    from asymlora.evaluate.run import load_for_eval

    evaluated, _, tasks = load_for_eval(adapter=str(run))  # the base and its quantization from the run's config
    assert tasks == ["color", "isred"]
    assert type(evaluated.adapter_layers[name].base_layer).__name__ == "Linear4bit"
    evaluated, _, _ = load_for_eval(adapter=str(run), quantization=None)  # --quantization none: a float base
    assert type(evaluated.adapter_layers[name].base_layer) is torch.nn.Linear

    common = ["--model", str(model_dir), "--adapter", str(run), "--task", "isred"]
    assert main(["export", *common, "--out", str(tmp_path / "peft")]) == 0
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    capsys.readouterr()
    assert main(["merge", *common, "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "4-bit" in err and "--dequantize" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()

    assert main(["merge", *common, "--dequantize", "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForImageTextToText

    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert merged.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)


@needs_bnb
def test_library_merge_into_quantized_base_is_refused(model_dir):
    model = asymlora.get_model(_quantized(model_dir, 4), asymlora.AsymLoraConfig(method="lora", r=4))
    with pytest.raises(ConfigError, match="dequantize"):
        model.merge()
