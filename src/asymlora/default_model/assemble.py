"""Put a causal LM and a ViT together into an HF ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

LLaVA's recipe: the vision tower encodes the image into patch features, a 2-layer GELU MLP (the
``multi_modal_projector``) maps them into the LM's embedding space, and the LM reads them in place of
the ``<image>`` placeholder tokens (one placeholder per image feature, expanded by the processor).

What :func:`assemble_llava` does, for any ``*ForCausalLM`` LLaVA accepts as text model and any ViT
with one CLS token (``Dinov2Model``, ``CLIPVisionModel``):

* adds ``<image>`` to the tokenizer as a named special token (``tokenizer.image_token``); if it is new,
  the LM's embedding matrix grows by one row set to the mean of the existing rows (the same for an
  untied ``lm_head``), so the token starts as an "average word" rather than noise;
* makes the chat template accept structured content (``{"type": "image"}`` / ``{"type": "text"}``
  parts) by wrapping the template's ``message['content']`` in a macro; string content renders exactly
  as before, so text-only prompts are unchanged;
* builds ``LlavaConfig`` from the two configs, loads both towers' weights strictly, initialises the
  projector from ``seed`` (HF's own initialisation) and ties ``lm_head`` to the input embeddings when
  the text config says so;
* builds an ImageNet-normalised, ``image_size`` x ``image_size`` image processor and a
  ``LlavaProcessor`` whose ``<image>`` expansion matches the number of features the model produces:
  ``(image_size / patch)^2 + 1`` (CLS) ``- 1`` if the strategy is ``"default"`` (CLS dropped).
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asymlora.config import IMAGE_TOKEN
from asymlora.errors import CheckpointError, ConfigError
from asymlora.io import atomic_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR = "multi_modal_projector"

_CONTENT = re.compile(r"message\[(['\"])content\1\]")
_CONTENT_MACRO = (
    "{%- macro asymlora_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ IMAGE_TOKEN }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _render(template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """Render a chat template the way transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **kwargs)


def _handles_structured_content(template: str, image_token: str) -> bool:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]
    try:
        rendered = _render(template, messages, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - any failure means "does not handle lists"
        return False
    return image_token + "probe" in rendered and "'type'" not in rendered


def multimodal_chat_template(template: str, image_token: str = IMAGE_TOKEN) -> str:
    """``template`` extended to render structured content; unchanged if it already does.

    Every ``message['content']`` becomes ``asymlora_content(message['content'])``, a macro that returns
    string content as it is and renders list content part by part: ``{"type": "image"}`` ->
    ``image_token``, ``{"type": "text", "text": t}`` -> ``t``.
    """
    if _handles_structured_content(template, image_token):
        return template
    if not _CONTENT.search(template):
        raise ConfigError("chat template: cannot find message['content'] to extend for image content")
    macro = _CONTENT_MACRO.replace("IMAGE_TOKEN", repr(image_token))
    extended = macro + _CONTENT.sub("asymlora_content(message['content'])", template)
    if not _handles_structured_content(extended, image_token):
        raise ConfigError("chat template: the extended template does not render image content")
    return extended


def add_image_token(tokenizer: Any, image_token: str = IMAGE_TOKEN) -> tuple[Any, bool]:
    """A copy of ``tokenizer`` with ``image_token`` as the named special token ``tokenizer.image_token``.

    Returns ``(tokenizer, added)``; ``added`` is True when the token was not in the vocabulary before.
    The copy goes through ``save_pretrained`` / ``from_pretrained`` (the public way to register a named
    extra special token), keeping the vocabulary, special tokens and chat template.
    """
    from transformers import AutoTokenizer

    added = image_token not in tokenizer.get_vocab()
    extras = [str(t) for t in getattr(tokenizer, "extra_special_tokens", []) or [] if str(t) != image_token]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        copy_ = AutoTokenizer.from_pretrained(tmp, extra_special_tokens={"image_token": image_token})
    for loading_only in ("is_local", "local_files_only"):  # from_pretrained's own arguments, not the tokenizer's
        copy_.init_kwargs.pop(loading_only, None)
    copy_.add_special_tokens({"extra_special_tokens": [*extras, image_token]}, replace_extra_special_tokens=True)
    if copy_.convert_tokens_to_ids(image_token) in (None, copy_.unk_token_id):
        raise ConfigError(f"tokenizer: could not add the image token {image_token!r}")
    return copy_, added


def image_processor_for(image_size: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                        std: tuple[float, ...] = IMAGENET_STD) -> Any:
    """Resize the short side to ``image_size`` (bicubic), centre-crop a square, scale to [0, 1], normalise."""
    from transformers import BitImageProcessor

    return BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                             do_center_crop=True, resample=3, image_mean=list(mean), image_std=list(std),
                             do_convert_rgb=True)


def _new_row_is_mean(language_model: nn.Module, token_id: int, old_rows: int) -> None:
    """Grow the embedding matrix to hold ``token_id`` and set that row to the mean of the old rows."""
    if token_id >= old_rows:
        language_model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    matrices = [language_model.get_input_embeddings().weight]
    output = language_model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            others = torch.cat([weight[: min(token_id, old_rows)], weight[token_id + 1: old_rows]])
            weight[token_id] = others.mean(dim=0)


def num_image_tokens(image_size: int, patch_size: int, strategy: str) -> int:
    """Features per image of a ViT with one CLS token: (image_size / patch)^2 patches + CLS (dropped by "default")."""
    if image_size % patch_size:
        raise ConfigError(f"image_size: {image_size} is not a multiple of the patch size {patch_size}")
    if strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy: {strategy!r} is not 'default' or 'full'")
    return (image_size // patch_size) ** 2 + (0 if strategy == "default" else 1)


def assemble_llava(language_model: nn.Module, tokenizer: Any, vision_model: nn.Module, *, image_size: int = 112,
                   vision_feature_layer: int = -4, vision_feature_select_strategy: str = "default",
                   projector_hidden_act: str = "gelu", image_token: str = IMAGE_TOKEN,
                   seed: int = 0) -> tuple[Any, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` from a causal LM, its tokenizer and a ViT.

    ``language_model`` is a ``*ForCausalLM`` (its embeddings are resized in place if ``<image>`` is
    new); ``vision_model`` a ViT with one CLS token, e.g. ``Dinov2Model``. ``vision_feature_layer``
    indexes ``hidden_states`` (``-1``: last layer, before the final layernorm); ``"default"`` drops the
    CLS feature, ``"full"`` keeps it. The projector is random (seeded): align it before use.
    """
    import transformers as tf

    vision_config = copy.deepcopy(vision_model.config)
    num_layers = vision_config.num_hidden_layers
    if not -num_layers - 1 <= vision_feature_layer <= num_layers:
        raise ConfigError(f"vision_feature_layer: {vision_feature_layer} is outside [-{num_layers + 1}, {num_layers}]")
    n_image_tokens = num_image_tokens(image_size, vision_config.patch_size, vision_feature_select_strategy)
    with torch.no_grad():
        probe = vision_model(pixel_values=torch.zeros(1, vision_config.num_channels, image_size, image_size,
                                                      dtype=next(vision_model.parameters()).dtype))
    if probe.last_hidden_state.shape[1] != (image_size // vision_config.patch_size) ** 2 + 1:
        raise ConfigError(f"vision model: {probe.last_hidden_state.shape[1]} tokens per {image_size} px image; "
                          "expected one CLS token plus one per patch")

    old_rows = language_model.get_input_embeddings().weight.shape[0]
    tokenizer, added = add_image_token(tokenizer, image_token)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if added:
        _new_row_is_mean(language_model, image_token_id, old_rows)
    if tokenizer.chat_template:
        tokenizer.chat_template = multimodal_chat_template(tokenizer.chat_template, image_token)

    text_config = copy.deepcopy(language_model.config)
    config = tf.LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                            image_seq_length=n_image_tokens, projector_hidden_act=projector_hidden_act,
                            vision_feature_layer=vision_feature_layer,
                            vision_feature_select_strategy=vision_feature_select_strategy,
                            multimodal_projector_bias=True,
                            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config)
    dtype = language_model.get_input_embeddings().weight.dtype
    model.to(dtype)
    model.model.language_model.load_state_dict(language_model.model.state_dict(), strict=True)
    model.model.vision_tower.load_state_dict(vision_model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(language_model.lm_head.state_dict(), strict=True)
    model.tie_weights()
    if config.tie_word_embeddings and model.lm_head.weight is not model.get_input_embeddings().weight:
        raise CheckpointError("lm_head is not tied to the input embeddings after tie_weights()")
    generation = getattr(language_model, "generation_config", None)
    if generation is not None:
        model.generation_config = copy.deepcopy(generation)

    processor = tf.LlavaProcessor(
        image_processor=image_processor_for(image_size), tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template, image_token=image_token,
    )
    return model.eval(), processor


def find_projector(model: nn.Module) -> nn.Module:
    """The ``multi_modal_projector`` module of a LLaVA model (also inside wrappers such as PEFT's)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == PROJECTOR:
            return module
    raise CheckpointError(f"{type(model).__name__} has no {PROJECTOR} module")


def save_projector(model: nn.Module, path: str | Path) -> Path:
    """Write the projector's weights to ``path`` (safetensors, keys ``multi_modal_projector.<name>``), atomically."""
    from safetensors.torch import save_file

    tensors = {f"{PROJECTOR}.{k}": v.detach().cpu().contiguous().clone()
               for k, v in find_projector(model).state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "content": "asymlora projector"})
    return path


def state_mismatches(state: dict[str, Any], expected: dict[str, Any], source: str,
                     limit: int | None = None) -> str | None:
    """How ``state`` fails to fit ``expected`` (missing and unexpected keys, shape mismatches, each list cut
    to ``limit`` items), or None when it fits; ``source`` names ``state``'s side in a shape mismatch."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return None
    return f"missing {missing[:limit]}, unexpected {unexpected[:limit]}, shape mismatches {shapes[:limit]}"


def load_projector(model: nn.Module, path: str | Path) -> None:
    """Load projector weights from a safetensors file into ``model`` (strict: every key, every shape).

    Keys may be relative to the projector (``linear_1.weight``) or carry any prefix ending in
    ``multi_modal_projector.`` (``model.multi_modal_projector.linear_1.weight``, as in a full LLaVA
    checkpoint). Tensors are cast to the projector's dtype and device.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: projector file not found")
    marker = PROJECTOR + "."
    loaded = {(k.split(marker, 1)[1] if marker in k else k): v for k, v in load_file(str(path)).items()}
    projector = find_projector(model)
    expected = projector.state_dict()
    problem = state_mismatches(loaded, expected, "file")
    if problem:
        raise CheckpointError(f"{path}: does not fit the model's projector: {problem}")
    projector.load_state_dict({k: v.to(dtype=expected[k].dtype, device=expected[k].device)
                               for k, v in loaded.items()}, strict=True)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a LLaVA model: total (tied weights once) and per part."""
    inner = model.model
    parts = {"language_model": inner.language_model, "vision_tower": inner.vision_tower,
             "multi_modal_projector": inner.multi_modal_projector}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    counts["lm_head_untied"] = 0 if model.lm_head.weight is model.get_input_embeddings().weight \
        else model.lm_head.weight.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
