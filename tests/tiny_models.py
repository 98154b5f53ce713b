"""Tiny random models of real transformers VLM classes (no downloads), for the tests."""

from __future__ import annotations

import torch
import transformers as tf

from asymlora import tiny as asymlora_tiny
from asymlora.tiny import tiny_llava_processor, tiny_tokenizer  # noqa: F401 - re-exported for tests

VOCAB = asymlora_tiny.VOCAB
IMAGE_TOKEN = asymlora_tiny.IMAGE_TOKEN_ID
TEXT = dict(asymlora_tiny.TEXT_CONFIG)


def case_id(case: dict) -> str:
    """A test id for an adapter-config case: method and routing."""
    return f"{case['method']}-{case.get('routing', 'default')}"


def tiny_llama_lm() -> tf.PreTrainedModel:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT)).eval()


def tiny_llava() -> tf.PreTrainedModel:
    return asymlora_tiny.tiny_llava(seed=0)


def tiny_llava_next() -> tf.PreTrainedModel:
    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(
        hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, projection_dim=16,
    )
    config = tf.LlavaNextConfig(
        vision_config=vision, text_config=tf.LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[28, 28]], vision_feature_layer=-1,
    )
    return tf.LlavaNextForConditionalGeneration(config).eval()


def tiny_qwen2_vl() -> tf.PreTrainedModel:
    torch.manual_seed(0)
    config = tf.Qwen2VLConfig(
        text_config=dict(TEXT, model_type="qwen2_vl_text", rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, in_channels=3, temporal_patch_size=2),
        image_token_id=IMAGE_TOKEN, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
    )
    return tf.Qwen2VLForConditionalGeneration(config).eval()


def tiny_qwen2_5_vl() -> tf.PreTrainedModel:
    torch.manual_seed(0)
    config = tf.Qwen2_5_VLConfig(
        text_config=dict(TEXT, model_type="qwen2_5_vl_text", rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, in_channels=3, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56),
        image_token_id=IMAGE_TOKEN, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
    )
    return tf.Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_idefics3(cls=tf.Idefics3ForConditionalGeneration, config_cls=tf.Idefics3Config) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    config = config_cls(
        text_config=tf.LlamaConfig(**TEXT),
        vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
        image_token_id=IMAGE_TOKEN, scale_factor=2,
    )
    return cls(config).eval()


def tiny_smolvlm() -> tf.PreTrainedModel:
    return tiny_idefics3(tf.SmolVLMForConditionalGeneration, tf.SmolVLMConfig)


def tiny_paligemma() -> tf.PreTrainedModel:
    torch.manual_seed(0)
    text = dict(TEXT, head_dim=8)
    config = tf.PaliGemmaConfig(
        text_config=tf.GemmaConfig(**text),
        vision_config=tf.SiglipVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        image_token_index=IMAGE_TOKEN, projection_dim=32,
    )
    return tf.PaliGemmaForConditionalGeneration(config).eval()


FAMILY_FACTORIES = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "paligemma": tiny_paligemma,
}


def image_batch(family: str, batch: int = 2, text_len: int = 6, seed: int = 0) -> dict:
    """input_ids with the family's image tokens + pixel inputs, labels and attention mask."""
    g = torch.Generator().manual_seed(seed)
    n_image_tokens = {"llava": 4, "llava_next": None, "paligemma": 4, "qwen2_vl": 1, "qwen2_5_vl": 1,
                      "idefics3": 1, "smolvlm": 1}[family]
    extra: dict = {}
    if family in ("llava", "paligemma"):
        extra["pixel_values"] = torch.randn(batch, 3, 28, 28, generator=g)
    elif family == "llava_next":
        extra["pixel_values"] = torch.randn(batch, 2, 3, 28, 28, generator=g)
        extra["image_sizes"] = torch.tensor([[28, 28]] * batch)
        n_image_tokens = 4 + 4 + 2  # base + one grid tile + one image_newline per row
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        extra["pixel_values"] = torch.randn(batch * 4, 3 * 2 * 14 * 14, generator=g)
        extra["image_grid_thw"] = torch.tensor([[1, 2, 2]] * batch)
    else:
        extra["pixel_values"] = torch.randn(batch, 1, 3, 28, 28, generator=g)
        extra["pixel_attention_mask"] = torch.ones(batch, 1, 28, 28, dtype=torch.bool)
    text = torch.randint(1, 100, (batch, text_len), generator=g)
    image = torch.full((batch, n_image_tokens), IMAGE_TOKEN)
    input_ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -1] = 0  # one padded position
    labels = input_ids.clone()
    labels[:, : 2 + n_image_tokens] = -100
    labels[attention_mask == 0] = -100
    if family in ("qwen2_vl", "qwen2_5_vl"):
        extra["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    if family == "paligemma":
        extra["token_type_ids"] = (labels != -100).long()
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)



# bitsandbytes' CPU 4-bit inference kernel repacks each weight in blocks of 64 inputs and 32 outputs: the
# tiny LLaVA's language model at hidden 64 / intermediate 128 (k/v projections 64 -> 32) satisfies it.
QLORA_TEXT = dict(TEXT, hidden_size=64, intermediate_size=128)


def save_tiny_llava_qlora(out) -> None:
    """A tiny random LLaVA whose language model bitsandbytes can quantize on CPU, with its processor."""
    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=asymlora_tiny.IMAGE_SIZE, patch_size=14, projection_dim=16)
    config = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**QLORA_TEXT),
                            image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                            vision_feature_select_strategy="default")
    tf.LlavaForConditionalGeneration(config).eval().save_pretrained(out)
    tiny_llava_processor().save_pretrained(out)
