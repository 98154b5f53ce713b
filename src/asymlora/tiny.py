"""A tiny random LLaVA (real transformers classes, random weights) for smoke tests and CI.

``asymlora build-tiny --out DIR`` writes a ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` with a
character-level tokenizer and a ChatML chat template: a few hundred thousand parameters, no download.
It exercises the whole pipeline (processor, chat template, image tokens, training, checkpoints) in
seconds; it does not learn anything useful.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from asymlora.config import IMAGE_TOKEN

VOCAB = 128
IMAGE_TOKEN_ID = 120  # the tokenizer id of IMAGE_TOKEN
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = {"<pad>": 0, "<unk>": 1, "<|im_start|>": 2, "<|im_end|>": 3, IMAGE_TOKEN: IMAGE_TOKEN_ID}
TEXT_CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0,
                   bos_token_id=2, eos_token_id=3)
IMAGE_SIZE = 28


def tiny_tokenizer() -> Any:
    """A character-level tokenizer over a 128-id vocabulary with ChatML special tokens."""
    import transformers as tf
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!'-:\n")
    vocab = dict(SPECIALS)
    free = [i for i in range(VOCAB) if i not in vocab.values()]
    vocab.update({c: free[i] for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>",
        eos_token="<|im_end|>", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", IMAGE_TOKEN]})
    fast.chat_template = CHATML
    return fast


def tiny_llava_processor() -> Any:
    import transformers as tf

    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return tf.LlavaProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(), chat_template=CHATML, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def tiny_llava(seed: int = 0) -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=IMAGE_SIZE, patch_size=14, projection_dim=16)
    config = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT_CONFIG),
                            image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-1,
                            vision_feature_select_strategy="default")
    return tf.LlavaForConditionalGeneration(config).eval()


def build_tiny(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny model + processor to ``out`` (atomically: a complete dir or none)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tiny_llava(seed).save_pretrained(tmp)
        tiny_llava_processor().save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        Path(tmp).rename(out)
    return out
