"""The adapter directory: ``adapter_config.json`` (config and layer manifest) + ``adapter_model.safetensors``.

Writing gathers sharded parameters (FSDP2 / tensor-parallel ``DTensor``) to full tensors and writes each
file atomically; reading checks the saved layers and tensors against the model's before anything is
copied, and copies into sharded parameters shard by shard. :meth:`asymlora.model.AsymLoraModel.save_pretrained`
and :func:`asymlora.model.load` are the entry points.

A file that is not a complete safetensors file, or a tensor with NaN/inf values, is a CheckpointError naming
the file (and the tensor). The manifest records the base model it was saved on: its ``name_or_path`` and
``weight_samples``, :data:`SAMPLES_PER_LAYER` values of the base weight of each of up to
:data:`SAMPLED_LAYERS` adapted layers (evenly spread over them in name order, at fixed positions), read
before any merge. Loading compares them with the model's own (to a relative :data:`SAMPLE_RTOL`, so that
loading in bfloat16 or float16 an adapter saved on float32 weights matches) and warns, naming both models,
where they differ: the layers' shapes are checked exactly anyway, so the samples tell apart models of the
same architecture with other weights. Reading them costs a few scalar reads, whatever the model's size.
Weights that are sharded (FSDP ``DTensor``, DeepSpeed ZeRO-3), packed (a bitsandbytes 4/8-bit base) or on the
meta device are not sampled; where either side has no samples the recorded ``name_or_path`` is compared
instead.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from asymlora.config import AsymLoraConfig
from asymlora.errors import CheckpointError
from asymlora.families import Family
from asymlora.io import atomic_path, read_json, write_json_atomic
from asymlora.layer import AsymLoraLinear
from asymlora.quantization import quantization_of
from asymlora.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SAMPLED_LAYERS = 8  # adapted layers whose base weight is sampled for the base model's fingerprint
SAMPLES_PER_LAYER = 4
SAMPLE_RTOL = 2 ** -7  # bfloat16 keeps 8 significant bits: its rounding moves a value by at most 2**-9
SAMPLE_ATOL = 1e-6  # float16 flushes tiny values to subnormals


# ---------------------------------------------------------------------------------------- writing
def adapter_manifest(config: AsymLoraConfig, base_model: nn.Module, family: Family, saved_modules: list[str],
                     layers: dict[str, AsymLoraLinear]) -> dict[str, Any]:
    """What ``adapter_config.json`` holds: the config, the base model's identity and every adapted layer."""
    base_config = getattr(base_model, "config", None)
    return {
        "asymlora_version": __version__,
        "config": config.to_dict(),
        "base_model": {
            "class": type(base_model).__name__,
            "model_type": getattr(base_config, "model_type", None),
            "name_or_path": getattr(base_config, "_name_or_path", None) or None,
            "family": family.name,
            "weight_samples": base_weight_samples(layers),
            "quantization": quantization_of(base_model),
        },
        "saved_modules": saved_modules,
        "layers": {
            name: {"in_features": layer.in_features, "out_features": layer.out_features, **asdict(layer.spec)}
            for name, layer in layers.items()
        },
    }


def base_weight_samples(layers: dict[str, AsymLoraLinear]) -> list[float] | None:
    """A few values of the adapted layers' base weights (before any merge), or None where a weight is sharded,
    not materialised or quantized (packed integers); see the module docstring."""
    names = sorted(layers)
    if not names:
        return None
    count = min(SAMPLED_LAYERS, len(names))
    chosen = [names[round(i * (len(names) - 1) / max(count - 1, 1))] for i in range(count)]
    samples: list[float] = []
    for name in chosen:
        layer = layers[name]
        weight = layer._base_backup if layer.merged_task is not None else layer.base_layer.weight
        if (weight is None or hasattr(weight, "device_mesh") or hasattr(weight, "ds_id") or weight.is_meta
                or weight.numel() == 0 or not weight.is_floating_point()):  # sharded, or packed (bitsandbytes)
            return None
        flat = weight.detach().reshape(-1)
        positions = [(k * 2_654_435_761) % flat.numel() for k in range(1, SAMPLES_PER_LAYER + 1)]
        samples += flat[torch.tensor(positions, device=flat.device)].float().cpu().tolist()
    return samples


def full_tensors(trainable: dict[str, torch.Tensor],
                 state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The whole tensor of every ``trainable`` name: gathered from its DTensor shards (a collective), or
    taken from ``state_dict``, an already gathered full state dict keyed by the base model's or the
    wrapper's parameter names (CheckpointError names the first trainable tensor missing from it)."""
    if state_dict is None:
        return {k: _full_tensor(v.detach()) for k, v in trainable.items()}
    return {k: _state_dict_entry(state_dict, k) for k in trainable}


def write_adapter(save_directory: str | Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Write ``tensors`` (moved to the CPU) and ``manifest`` into ``save_directory``, each file atomically."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "asymlora_version": __version__})
    write_json_atomic(out / CONFIG_NAME, manifest)


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective over its mesh); any other tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def _state_dict_entry(state_dict: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``name`` (a base-model parameter name) in a full state dict of the base model or of the wrapper."""
    for key in (name, "base_model." + name):
        if key in state_dict:
            return _full_tensor(state_dict[key])
    hint = (" (DeepSpeed ZeRO-3 hands an empty one unless stage3_gather_16bit_weights_on_model_save is true)"
            if not state_dict else "")
    raise CheckpointError(f"state_dict: the trainable tensor {name!r} is missing from the state dict given to "
                          f"save_pretrained ({len(state_dict)} keys){hint}; nothing was written")


# ---------------------------------------------------------------------------------------- reading
def read_adapter_config(adapter_dir: str | Path) -> tuple[AsymLoraConfig, dict[str, Any]]:
    """The config and the whole manifest of an adapter directory (both files must exist)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    for path in (config_path, adapter_dir / WEIGHTS_NAME):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; an asymlora adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    manifest = read_json(config_path, f"an asymlora {CONFIG_NAME}", CheckpointError)
    config = AsymLoraConfig.from_document(manifest, source=str(config_path))  # the file is read once
    return config, manifest


def check_layers(adapter_dir: str | Path, saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> None:
    """CheckpointError unless the saved layer manifest equals the model's (same modules, same specs)."""
    config_path = Path(adapter_dir) / CONFIG_NAME
    missing, extra = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    if missing or extra:
        raise CheckpointError(
            f"{config_path}: target modules differ from the model's: in the adapter only: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; in the model only: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    for name, layer in saved.items():
        if layer != current[name]:
            diff = {k: (layer.get(k), current[name].get(k)) for k in set(layer) | set(current[name])
                    if layer.get(k) != current[name].get(k)}
            raise CheckpointError(f"{config_path}: layer {name} differs (adapter, model): {diff}")


def check_base_model(adapter_dir: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Warn where the base model recorded in an adapter's manifest is not the one it is loaded on (see the
    module docstring); ``saved`` and ``current`` are the manifests' ``base_model`` entries."""
    saved_samples, current_samples = saved.get("weight_samples"), current.get("weight_samples")
    saved_name, current_name = saved.get("name_or_path"), current.get("name_or_path")
    if saved_samples and current_samples:
        differs = len(saved_samples) != len(current_samples) or not all(
            math.isclose(a, b, rel_tol=SAMPLE_RTOL, abs_tol=SAMPLE_ATOL) for a, b in zip(saved_samples, current_samples))
        why = "its base weights differ from those the adapter was saved on"
    else:
        differs = bool(saved_name and current_name and saved_name != current_name)
        why = "the base weights could not be compared (sharded), and the names differ"
    if differs:
        warnings.warn(f"{Path(adapter_dir) / CONFIG_NAME}: this adapter was saved on base model {saved_name!r} and is "
                      f"loaded on {current_name!r}: {why}; its outputs are not those it was trained to give",
                      stacklevel=3)


def restore_tensors(adapter_dir: str | Path, params: dict[str, torch.Tensor]) -> None:
    """Copy the saved tensors into ``params`` exactly, after checking that the names and shapes match and that
    every value is finite."""
    weights_path = Path(adapter_dir) / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path}: not a complete safetensors file ({err}); the adapter dir is "
                              "damaged (a cut copy or an interrupted write): save or copy it again") from None
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: tensors missing from the file: {missing[:5]}; "
                              f"not in the model: {unexpected[:5]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise CheckpointError(f"{weights_path}: {key} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(params[key].shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{weights_path}: tensor {key} holds {bad} NaN/inf value(s) of {value.numel()}; "
                                  "such an adapter predicts nothing useful: load an earlier checkpoint of its run, "
                                  "or train again (e.g. with a lower training.learning_rate)")
    with torch.no_grad():
        for key, value in tensors.items():
            _copy_into(params[key], value)


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, sharding it first where the parameter is a DTensor (FSDP2)."""
    value = value.to(param.dtype)
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None:  # each rank read the whole file, so each takes its own shard locally
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device), mesh, param.placements, src_data_rank=None)
    param.copy_(value)
