"""A quantized base model (QLoRA): bitsandbytes 4-bit or 8-bit weights under float adapters.

The option, in a training config's ``model`` section or as ``--quantization`` of ``eval`` / ``analyze``::

    quantization: {bits: 4 | 8, quant_type: nf4 | fp4, compute_dtype: float32 | bfloat16 | float16,
                   double_quant: false}

``bits`` is required; the rest default to ``nf4``, ``float32`` and ``false`` (``quant_type``,
``compute_dtype`` and ``double_quant`` apply to 4-bit only). The base is loaded through transformers'
``BitsAndBytesConfig``; the language model's linear layers are quantized, the vision tower, the projector
and ``lm_head`` stay in float (the projector is often trained as a module_to_save, and a quantized weight
cannot be trained). Training prepares the model as PEFT's ``prepare_model_for_kbit_training`` does (it is
called): every base parameter frozen, the float ones (norms, embeddings) in float32, input gradients on for
gradient checkpointing. Needs ``bitsandbytes>=0.48`` (``pip install 'asymlora[qlora]'``), which runs on CPU.

A quantized weight is not a float matrix that W + s B A can be added to: merging into it is refused, and
:func:`dequantize_model` replaces each quantized layer by an ``nn.Linear`` holding its dequantized weight
(what ``asymlora merge --dequantize`` does before it folds the adapter in).
"""

from __future__ import annotations

import argparse
from typing import Any

from asymlora.errors import ConfigError

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULTS: dict[str, Any] = {"quant_type": "nf4", "compute_dtype": "float32", "double_quant": False}
KEYS = ("bits", *DEFAULTS)
QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")


def check_quantization(value: Any, source: str = "config", field: str = "model.quantization") -> dict[str, Any] | None:
    """The quantization option with its defaults filled in, or None for a float base (``value`` None or
    false). A bare 4 or 8 means ``{bits: 4}`` / ``{bits: 8}``. ConfigError names the key at fault."""
    if value is None or value is False:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"bits": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {field}: expected a mapping {{bits: 4|8, quant_type, compute_dtype, "
                          f"double_quant}} or null, got {value!r:.60}")
    unknown = [k for k in value if k not in KEYS]
    if unknown:
        raise ConfigError(f"{source}: {field}.{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    if "bits" not in value:
        raise ConfigError(f"{source}: {field}.bits: missing; one of {BITS}")
    result = {**DEFAULTS, **value}
    checks = (("bits", BITS), ("quant_type", QUANT_TYPES), ("compute_dtype", COMPUTE_DTYPES),
              ("double_quant", (True, False)))
    for key, allowed in checks:
        got = result[key]
        if isinstance(got, bool) != (key == "double_quant") or got not in allowed:
            raise ConfigError(f"{source}: {field}.{key}: {got!r} is not one of {allowed}")
    return result


def parse_quantization(text: str | None, flag: str = "--quantization") -> dict[str, Any] | None:
    """A command-line value: ``4``, ``8``, ``none`` or a YAML/JSON mapping (``'{bits: 4, quant_type: fp4}'``)."""
    if text is None or text.strip().lower() in ("none", "null", "false", ""):
        return None
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag}: {text!r} is not 4, 8, none or a YAML/JSON mapping ({err.problem})") from None
    return check_quantization(value, source=flag, field="quantization")


def quantization_argument(text: str | None) -> Any:
    """``--quantization`` as the loaders take it: ``"auto"`` (the option the adapter's training config
    records) when the flag is absent, else :func:`parse_quantization`'s value."""
    return "auto" if text is None else parse_quantization(text)


def add_quantization_argument(parser: argparse.ArgumentParser, default_help: str = "a float base") -> None:
    """Add ``--quantization`` to a command that loads a base model (eval, analyze, chat, predict)."""
    parser.add_argument(
        "--quantization", metavar="SPEC",
        help="load the base quantized with bitsandbytes: 4, 8, none, or a YAML/JSON mapping "
        "'{bits: 4, quant_type: nf4|fp4, compute_dtype: float32|bfloat16|float16, double_quant: false}' "
        f"(default: {default_help})")


def bitsandbytes_config(quantization: dict[str, Any], model_type: str | None) -> Any:
    """transformers' ``BitsAndBytesConfig`` for a checked option, leaving the vision tower, the projector and
    ``lm_head`` of ``model_type``'s family unquantized."""
    import importlib.util

    import torch
    import transformers

    from asymlora.config import TORCH_DTYPES
    from asymlora.families import FAMILIES

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization: needs bitsandbytes>=0.48, which is not installed; "
                          "pip install 'asymlora[qlora]'")
    skip = ["lm_head"]
    for family in FAMILIES:
        if model_type in family.model_types:
            skip += [p for p in (family.vision_tower, family.projector) if p]
    bits = quantization["bits"]
    return transformers.BitsAndBytesConfig(
        load_in_4bit=bits == 4, load_in_8bit=bits == 8,
        bnb_4bit_quant_type=quantization["quant_type"],
        bnb_4bit_compute_dtype=TORCH_DTYPES.get(quantization["compute_dtype"], torch.float32),
        bnb_4bit_use_double_quant=quantization["double_quant"],
        llm_int8_skip_modules=skip,
    )


def quantization_of(model: Any) -> dict[str, Any] | None:
    """The quantization option a loaded model was quantized with (from its ``quantization_config``), or None."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    values = config if isinstance(config, dict) else config.to_dict()
    if values.get("load_in_4bit") or values.get("_load_in_4bit"):
        dtype = values.get("bnb_4bit_compute_dtype") or "float32"
        return {"bits": 4, "quant_type": values.get("bnb_4bit_quant_type", "nf4"),
                "compute_dtype": str(dtype).replace("torch.", ""),
                "double_quant": bool(values.get("bnb_4bit_use_double_quant", False))}
    if values.get("load_in_8bit") or values.get("_load_in_8bit"):
        return {"bits": 8, **DEFAULTS}
    return None


def is_quantized_layer(module: Any) -> bool:
    """Whether ``module`` is a bitsandbytes quantized linear layer."""
    return type(module).__name__ in QUANTIZED_LAYERS and type(module).__module__.startswith("bitsandbytes")


def prepare_for_kbit_training(model: Any, gradient_checkpointing: bool = False,
                              checkpointing_kwargs: dict[str, Any] | None = None) -> Any:
    """PEFT's ``prepare_model_for_kbit_training`` on a quantized base: every parameter frozen, the float ones
    in float32, and with ``gradient_checkpointing`` the input embeddings' outputs requiring grad (so that
    checkpointed blocks, whose weights are all frozen, still pass gradients to the adapters)."""
    from peft import prepare_model_for_kbit_training

    kwargs = {"activation_checkpointing_kwargs": checkpointing_kwargs or {"use_reentrant": False}}
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing, **kwargs)


def dequantized_weight(layer: Any) -> Any:
    """The float32 weight (out_features, in_features) of a bitsandbytes 4-bit or 8-bit linear layer."""
    import bitsandbytes.functional as bnbf
    import torch

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad forward;
            # its own state-dict writer undoes that the same way before saving.
            weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
            state = weight.quant_state
        return bnbf.dequantize_4bit(weight.data, state).to(torch.float32)
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = getattr(getattr(layer, "state", None), "SCB", None)
    if scale is None:
        raise ConfigError(f"dequantize: {type(layer).__name__} holds no int8 scales (SCB); it cannot be dequantized")
    return bnbf.int8_vectorwise_dequant(weight.data, scale.to(weight.data.device)).to(torch.float32)


def dequantize_model(model: Any, dtype: Any = None) -> int:
    """Replace every bitsandbytes linear layer of ``model`` (also one wrapped by an asymlora layer) by an
    ``nn.Linear`` with its dequantized weight in ``dtype`` (default float32), and drop the model's
    quantization config so that ``save_pretrained`` writes a plain float model. Returns the layers replaced."""
    import torch
    from torch import nn

    dtype = dtype or torch.float32
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_quantized_layer(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dequantized_weight(module).to(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        linear.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if attr in getattr(model, "__dict__", {}):
            delattr(model, attr)
    return replaced
