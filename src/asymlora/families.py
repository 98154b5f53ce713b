"""Where the language model, vision tower and projector live in each VLM family.

Paths are module names relative to the top-level ``*ForConditionalGeneration`` model of
transformers >= 5. ``lm_head`` is never adapted by 'all-linear'.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from asymlora.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    language_model: str
    vision_tower: str | None
    projector: str | None
    max_images_per_sample: int | None = None  # None: any number

    def part_prefix(self, part: str) -> str | None:
        return {"language_model": self.language_model, "vision_tower": self.vision_tower,
                "projector": self.projector}[part]

    def part_of(self, module_name: str) -> str | None:
        """Which part a module belongs to (the projector is checked first: Qwen2-VL nests it in the tower)."""
        for part in ("projector", "vision_tower", "language_model"):
            prefix = self.part_prefix(part)
            if prefix is not None and (prefix == "" or module_name == prefix or module_name.startswith(prefix + ".")):
                return part
        return None


FAMILIES: tuple[Family, ...] = (
    Family("llava", ("llava",), "model.language_model", "model.vision_tower", "model.multi_modal_projector"),
    Family("llava_next", ("llava_next", "llava_onevision", "llava_next_video"), "model.language_model",
           "model.vision_tower", "model.multi_modal_projector"),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "model.language_model", "model.visual", "model.visual.merger"),
    Family("idefics3", ("idefics3", "smolvlm"), "model.text_model", "model.vision_model", "model.connector"),
    Family("paligemma", ("paligemma",), "model.language_model", "model.vision_tower",
           "model.multi_modal_projector", max_images_per_sample=1),
)
# Text-only causal LMs (LlamaForCausalLM, ...): the whole model but lm_head is the language model.
CAUSAL_LM = Family("causal_lm", (), "model", None, None)


def family_for(model: nn.Module) -> Family:
    """The family of ``model`` from ``model.config.model_type`` (never from a folder name)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    modules = dict(model.named_modules())
    for family in FAMILIES:  # an unlisted model type laid out like a known family
        if all(p in modules for p in (family.language_model, family.vision_tower, family.projector)):
            return family
    if "model" in modules and hasattr(model, "lm_head"):
        return CAUSAL_LM
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(
        f"model_type {model_type!r} is not a supported family (supported: {known} and causal LMs); "
        "use a regex target_modules to adapt it anyway"
    )


def resolve_alias(family: Family, name: str) -> str:
    """'projector' / 'vision_tower' / 'language_model' -> the family's module path; other names unchanged."""
    if name in ("projector", "vision_tower", "language_model"):
        prefix = family.part_prefix(name)
        if prefix is None:
            raise ConfigError(f"modules_to_save: {name!r} does not exist in a {family.name} model")
        return prefix
    return name
