"""The sample encoder and collator on the tiny LLaVA processor (real LlavaProcessor, ChatML template)."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import IMAGE_TOKEN, tiny_llava, tiny_llava_processor

from asymlora.data.collator import IGNORE_INDEX, Collator, SampleEncoder, to_conversation


@dataclass
class FakeSample:  # the reader's Sample fields the encoder uses
    messages: list
    images: list = field(default_factory=list)
    task: str | None = None
    id: str = "s"
    source: str = "test.json:1"


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(path)
    return path


def test_to_conversation_splits_image_placeholders():
    conv = to_conversation([{"role": "user", "content": "<image>\nwhat? <image>"}])
    assert conv[0]["content"] == [{"type": "image"}, {"type": "text", "text": "\nwhat? "}, {"type": "image"}]


def test_labels_cover_only_assistant_replies(image):
    processor = tiny_llava_processor()
    encoder = SampleEncoder(processor, tasks=["color", "shape"], max_length=512)
    sample = FakeSample(
        messages=[{"role": "user", "content": "<image>\nwhat color?"}, {"role": "assistant", "content": "red."},
                  {"role": "user", "content": "and shape?"}, {"role": "assistant", "content": "square."}],
        images=[image], task="shape")
    item = encoder(sample)
    tokenizer = processor.tokenizer
    supervised = tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX])
    assert supervised == "red.<|im_end|>\nsquare.<|im_end|>\n"
    assert (item["input_ids"] == IMAGE_TOKEN).sum() == 4
    assert item["task_id"] == 1 and item["pixel_values"].shape == (1, 3, 28, 28)


def test_truncation_never_cuts_image_tokens(image):
    processor = tiny_llava_processor()
    long_prompt = FakeSample(messages=[{"role": "user", "content": "x" * 60 + "<image>"},
                                       {"role": "assistant", "content": "ok"}], images=[image])
    encoder = SampleEncoder(processor, max_length=40)
    assert encoder(long_prompt) is None and encoder.too_long == 1 and encoder.skipped_ids == ["s"]
    long_answer = FakeSample(messages=[{"role": "user", "content": "<image>hi"},
                                       {"role": "assistant", "content": "y" * 80}], images=[image])
    item = encoder(long_answer)
    assert item["input_ids"].shape[0] == 40 and (item["input_ids"] == IMAGE_TOKEN).sum() == 4
    assert (item["labels"] != IGNORE_INDEX).sum() > 0


def test_unknown_task_is_an_error(image):
    encoder = SampleEncoder(tiny_llava_processor(), tasks=["a"])
    with pytest.raises(Exception, match="task: 'b' is not one of"):
        encoder(FakeSample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                           task="b"))


def test_collator_pads_and_model_runs(image):
    processor = tiny_llava_processor()
    encoder = SampleEncoder(processor, tasks=["a", "b"])
    items = [
        encoder(FakeSample(messages=[{"role": "user", "content": "<image>what?"},
                                     {"role": "assistant", "content": "a red square."}], images=[image], task="a")),
        encoder(FakeSample(messages=[{"role": "user", "content": "text only"},
                                     {"role": "assistant", "content": "yes"}], task="b")),
        None,  # a sample that was too long
    ]
    collator = Collator(pad_token_id=processor.tokenizer.pad_token_id)
    batch = collator(items)
    assert collator.dropped == 1
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["task_ids"].tolist() == [0, 1] and batch["pixel_values"].shape[0] == 1
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    out = tiny_llava()(**{k: v for k, v in batch.items() if k != "task_ids"})
    assert torch.isfinite(out.loss)
    left = Collator(pad_token_id=0, padding_side="left")(items[:2])
    assert left["attention_mask"][1, 0] == 0 and left["attention_mask"][1, -1] == 1
