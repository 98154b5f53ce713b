"""The adapter directory: ``adapter_config.json`` (config and layer manifest) + ``adapter_model.safetensors``.

Writing gathers sharded parameters (FSDP2 / tensor-parallel ``DTensor``) to full tensors and writes each
file atomically; reading checks the saved layers and tensors against the model's before anything is
copied, and copies into sharded parameters shard by shard. :meth:`asymlora.model.AsymLoraModel.save_pretrained`
and :func:`asymlora.model.load` are the entry points.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
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
            "quantization": quantization_of(base_model),
        },
        "saved_modules": saved_modules,
        "layers": {
            name: {"in_features": layer.in_features, "out_features": layer.out_features, **asdict(layer.spec)}
            for name, layer in layers.items()
        },
    }


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


def restore_tensors(adapter_dir: str | Path, params: dict[str, torch.Tensor]) -> None:
    """Copy the saved tensors into ``params`` exactly, after checking that the names and shapes match."""
    weights_path = Path(adapter_dir) / WEIGHTS_NAME
    tensors = load_file(str(weights_path))
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{weights_path}: tensors missing from the file: {missing[:5]}; "
                              f"not in the model: {unexpected[:5]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise CheckpointError(f"{weights_path}: {key} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(params[key].shape)}")
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
