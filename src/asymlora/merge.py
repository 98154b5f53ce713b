"""One task's adapter as plain weights: folded into the base weights, or written as a PEFT LoRA adapter.

Both exist only where a layer's update is a fixed matrix for the task, W + s B_t A (task routing, or a
single expert); a router-gated layer raises NotImplementedError (:meth:`AsymLoraLinear.delta_weight`)
before anything is changed or written, and a quantized base layer (bitsandbytes) refuses a merge (ConfigError)
until it is dequantized (:func:`asymlora.quantization.dequantize_model`). :meth:`asymlora.model.AsymLoraModel.merge`, ``unmerge`` and
``export_peft`` are the entry points.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from asymlora.config import LayerSpec
from asymlora.errors import AsymLoraError, ConfigError
from asymlora.io import atomic_path, write_json_atomic
from asymlora.layer import AsymLoraLinear


def merge_layers(layers: Iterable[AsymLoraLinear], task_id: int | None) -> None:
    """Fold W + s B_t A into every layer's base weight; all or none (each is checked first, and a failure
    part way unmerges the layers merged before it)."""
    layers = list(layers)
    for layer in layers:  # check all first: never leave the model half merged
        layer.delta_weight(task_id)
        if not layer.base_layer.weight.is_floating_point():
            raise ConfigError(f"merge: {layer.name} is a quantized {type(layer.base_layer).__name__} (bitsandbytes); "
                              "W + s*B*A cannot be folded into its integer weights: dequantize the base first "
                              "(asymlora merge --dequantize, or asymlora.quantization.dequantize_model)")
    merged: list[AsymLoraLinear] = []
    try:
        for layer in layers:
            layer.merge(task_id)
            merged.append(layer)
    except Exception:
        for layer in merged:
            layer.unmerge()
        raise


def unmerge_layers(layers: Iterable[AsymLoraLinear]) -> None:
    """Restore every layer's exact base weight."""
    for layer in layers:
        layer.unmerge()


def write_peft_adapter(save_directory: str | Path, layers: dict[str, AsymLoraLinear],
                       saved_modules: dict[str, nn.Module], task_id: int | None,
                       base_model_name: str | None = None) -> None:
    """Write a PEFT LoRA adapter for task ``task_id``: per layer A (lora_moe: the task's A_t) and B_t, and
    the ``saved_modules`` (name -> module) whole; loadable by ``PeftModel.from_pretrained``."""
    from peft import LoraConfig  # optional at import time: only this export needs peft

    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    specs: list[LayerSpec] = []
    for name, layer in layers.items():
        layer.delta_weight(task_id)  # raises NotImplementedError / ConfigError where no export exists
        spec = layer.spec
        expert = task_id if spec.num_experts > 1 else 0
        A = layer.A_bank[expert * spec.r:(expert + 1) * spec.r] if spec.num_A > 1 else layer.A_bank
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.B_bank[expert].detach().cpu().contiguous()
        ranks[name], alphas[name] = spec.r, spec.alpha
        specs.append(spec)
    for name, module in saved_modules.items():
        for pname, param in module.named_parameters():
            tensors[f"base_model.model.{name}.{pname}"] = param.detach().cpu().contiguous()
    if not specs:
        raise AsymLoraError("export_peft: this adapter has no adapted layers (only modules_to_save); save it with "
                            "save_pretrained instead")
    first = specs[0]
    if len({s.use_rslora for s in specs}) > 1:
        raise NotImplementedError("export_peft: PEFT has one use_rslora flag per adapter; layers differ")
    peft_config = LoraConfig(
        r=first.r, lora_alpha=first.alpha, use_rslora=first.use_rslora, lora_dropout=first.dropout,
        target_modules=list(layers),
        rank_pattern={f"^{re.escape(n)}$": r for n, r in ranks.items() if r != first.r},
        alpha_pattern={f"^{re.escape(n)}$": a for n, a in alphas.items() if a != first.alpha},
        modules_to_save=list(saved_modules) or None,
        base_model_name_or_path=base_model_name,
    )
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    peft_json = peft_config.to_dict()
    peft_json = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_json.items()}
    peft_json["peft_type"] = "LORA"
    write_json_atomic(out / "adapter_config.json", peft_json)
