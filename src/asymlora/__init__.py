"""asymlora: asymmetric LoRA (shared A, B bank, task and learned routing) for multimodal LLMs.

Quick use::

    import asymlora
    config = asymlora.AsymLoraConfig(method="asymlora_moe", r=8, num_experts=4, tasks=["vqa", "ocr"])
    model = asymlora.get_model(hf_model, config)          # injects layers, freezes the rest
    out = model(**batch, task_ids=task_ids)               # loss = out.loss + w * model.aux_loss
    model.save_pretrained("adapter/")                     # every trainable tensor, safetensors
    model = asymlora.load(fresh_hf_model, "adapter/")     # exact restore
    asymlora.answer(model, processor, "cat.png", "What is it?", task="vqa")   # -> str (asymlora.inference)
"""

from asymlora.config import AsymLoraConfig, LayerSpec
from asymlora.errors import AsymLoraError, CheckpointError, ConfigError, DataError, MissingAssetError
from asymlora.inference import Question, answer, answer_batch
from asymlora.layer import AsymLoraLinear
from asymlora.model import (
    AsymLoraModel,
    export_peft,
    find_target_modules,
    format_param_report,
    get_model,
    load,
    param_report,
)
from asymlora.version import __version__

__all__ = [
    "__version__",
    "AsymLoraConfig",
    "AsymLoraError",
    "AsymLoraLinear",
    "AsymLoraModel",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LayerSpec",
    "MissingAssetError",
    "Question",
    "answer",
    "answer_batch",
    "export_peft",
    "find_target_modules",
    "format_param_report",
    "get_model",
    "load",
    "param_report",
]
