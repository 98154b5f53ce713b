"""Loading a base model and its processor from a model name ('default', 'tiny') or a local HF directory."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from asymlora import default_model
from asymlora.assets import cache_dir
from asymlora.config import TORCH_DTYPES
from asymlora.default_model import aligned_projector_path, find_projector, load_projector
from asymlora.errors import CheckpointError, ConfigError, MissingAssetError
from asymlora.tiny import build_tiny


def load_base_model(model_dir: str | Path, dtype: Any = None, quantization: dict[str, Any] | None = None) -> Any:
    """Load a local HF checkpoint with the Auto class its config implies (never from the folder name);
    ``quantization``: a checked :mod:`asymlora.quantization` option (bitsandbytes 4/8-bit) or None."""
    import torch
    import transformers

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"--model {model_dir}: no config.json there; pass a local Hugging Face model dir")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    auto = transformers.AutoModelForCausalLM
    if hasattr(config, "vision_config"):
        auto = transformers.AutoModelForImageTextToText
    if not quantization:
        return auto.from_pretrained(model_dir, dtype=dtype or torch.float32)
    from asymlora.quantization import bitsandbytes_config

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return auto.from_pretrained(model_dir, dtype=dtype or torch.float32, device_map={"": device},
                                quantization_config=bitsandbytes_config(quantization, config.model_type))


def resolve_model_dir(path: str) -> Path:
    """'default' (the built offline model), 'tiny' (a tiny random LLaVA, built on first use) or a local dir."""
    if path == "tiny":
        model_dir = cache_dir() / "models" / "tiny"
        return model_dir if (model_dir / "config.json").is_file() else build_tiny(model_dir)
    if path == "default":
        model_dir = default_model.default_model_dir()
        if default_model.read_manifest(model_dir) is None:
            raise MissingAssetError(f"model.path: the default model is not built at {model_dir}. Run: asymlora setup "
                                    "--only smollm2 gguf dinov2 onnx ml_dtypes protobuf && asymlora build-default")
        return model_dir
    model_dir = Path(path).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.path: {model_dir} is not a local Hugging Face model directory (no config.json)")
    return model_dir


def load_model_and_processor(path: str = "default", dtype: str = "float32", projector: str | None = None,
                             quantization: Any = None) -> tuple[Any, Any]:
    """Load the frozen base model (its Auto class follows its config) and its processor.

    ``path``: a model name or local dir (:func:`resolve_model_dir`); ``dtype``: a name in
    :data:`~asymlora.config.TORCH_DTYPES`; ``projector``: projector weights to load over the model's
    (a safetensors file, or ``"aligned"`` for the default model's shipped stage-1 projector);
    ``quantization``: None (float) or the option of :mod:`asymlora.quantization` (``{bits: 4, ...}``).
    """
    import transformers

    from asymlora.quantization import check_quantization

    model_dir = resolve_model_dir(path)
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"model.dtype: {dtype!r} is not one of {tuple(TORCH_DTYPES)}")
    model = load_base_model(model_dir, dtype=TORCH_DTYPES[dtype], quantization=check_quantization(quantization))
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        processor = transformers.AutoTokenizer.from_pretrained(model_dir)
    if projector:
        weights = aligned_projector_path() if projector == "aligned" else projector
        try:
            with gathered_parameters(find_projector(model)):
                load_projector(model, weights)
        except (KeyError, RuntimeError, ValueError) as err:
            raise ConfigError(f"model.projector: {weights} does not match this model's projector: {err}") from None
    return model, processor


def gathered_parameters(module: Any) -> Any:
    """A context in which ``module``'s parameters are whole: ZeRO-3 partitions them while loading."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    # Every rank writes the same values; rank 0's are kept and partitioned again on exit.
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)
