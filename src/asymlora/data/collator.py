"""Turn samples into model inputs with the model's own processor and chat template.

For each sample the conversation (text with ``<image>`` placeholders) becomes HF structured content
(``{"type": "image"}`` / ``{"type": "text"}`` parts) and ``processor.apply_chat_template`` renders it, so
every family gets its own image tokens and prompt format. Labels are -100 everywhere except the
assistant replies: the reply of turn i spans the tokens between the rendered prefix
``messages[:i]`` (with the generation prompt) and the rendered ``messages[:i+1]``.

Samples longer than ``max_length`` are cut only after their last image token; a sample that cannot
be cut without losing image tokens (or that keeps no supervised token) is skipped and counted in
``SampleEncoder.too_long`` -- never cut mid-image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asymlora.config import IMAGE_TOKEN
from asymlora.errors import DataError

IGNORE_INDEX = -100
_IMAGE = re.compile(re.escape(IMAGE_TOKEN))
# Keys of a processor's output that are per-token sequences (padded like input_ids, with 0).
SEQUENCE_KEYS = ("token_type_ids", "mm_token_type_ids")


def to_conversation(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with ``<image>`` placeholders in string content -> HF structured content."""
    conversation = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            parts: list[dict[str, Any]] = []
            for i, piece in enumerate(_IMAGE.split(content)):
                if i:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            content = parts
        conversation.append({"role": message["role"], "content": content})
    return conversation


def image_token_ids(processor: Any) -> set[int]:
    """Ids of the tokens that stand for image features in this processor's output."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = set()
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(processor, attr, None)
        if isinstance(value, int):
            ids.add(value)
    for token in (IMAGE_TOKEN, "<|image_pad|>", getattr(processor, "image_token", None)):
        if isinstance(token, str):
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return ids


def load_image(path: str | Path, source: str = "") -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"{source or path}: image {path}: cannot be read: {err}") from None


@dataclass
class SampleEncoder:
    """Encode one sample: input_ids, labels, image tensors and task id (None if it does not fit)."""

    processor: Any
    tasks: Sequence[str] = ()
    max_length: int = 2048
    too_long: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._image_ids = image_token_ids(self.processor)
        self._task_index = {name: i for i, name in enumerate(self.tasks)}

    def _render(self, conversation: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(conversation, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _tokenize(self, text: str, images: list[Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        return self.processor(**kwargs)

    def task_id(self, sample: Any) -> int:
        task = getattr(sample, "task", None)
        if task is None or not self._task_index:
            return -1
        if task not in self._task_index:
            raise DataError(f"{getattr(sample, 'source', '?')}: task: {task!r} is not one of {list(self.tasks)}")
        return self._task_index[task]

    def __call__(self, sample: Any) -> dict[str, Any] | None:
        conversation = to_conversation(sample.messages)
        images = [load_image(p, getattr(sample, "source", "")) for p in sample.images]
        full_text = self._render(conversation, generation_prompt=False)
        encoded = self._tokenize(full_text, images)
        input_ids = encoded["input_ids"][0]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        seen_images = 0
        for i, message in enumerate(conversation):
            seen_images += sum(part.get("type") == "image" for part in message["content"])
            if message["role"] != "assistant":
                continue
            prefix = self._render(conversation[:i], generation_prompt=True)
            through = self._render(conversation[: i + 1], generation_prompt=False)
            if not (full_text.startswith(prefix) and full_text.startswith(through)):
                raise DataError(f"{getattr(sample, 'source', '?')}: the chat template does not render turns as "
                                "prefixes of the whole conversation; cannot locate the assistant reply")
            start = self._tokenize(prefix, images[:seen_images])["input_ids"].shape[1]
            end = (input_ids.shape[0] if through == full_text
                   else self._tokenize(through, images[:seen_images])["input_ids"].shape[1])
            labels[start:end] = input_ids[start:end]
        features = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
        length = input_ids.shape[0]
        if length > self.max_length:
            image_positions = torch.isin(input_ids, torch.tensor(sorted(self._image_ids))).nonzero()
            last_image = int(image_positions.max()) if image_positions.numel() else -1
            if last_image >= self.max_length or not (labels[: self.max_length] != IGNORE_INDEX).any():
                self.too_long += 1
                self.skipped_ids.append(str(getattr(sample, "id", "?")))
                return None
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            for key in SEQUENCE_KEYS:
                if key in features:
                    features[key] = features[key][:, : self.max_length]
        return {"input_ids": input_ids, "labels": labels, "task_id": self.task_id(sample), **features}


@dataclass
class Collator:
    """Pad encoded samples into a batch; image tensors are concatenated along dim 0."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    dropped: int = 0

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        batch_items = [item for item in items if item is not None]
        self.dropped += len(items) - len(batch_items)
        if not batch_items:
            raise DataError("a whole batch of samples was longer than max_length; raise data.max_length")
        longest = max(item["input_ids"].shape[0] for item in batch_items)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(batch_items)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        sequences: dict[str, torch.Tensor] = {}
        for row, item in enumerate(batch_items):
            length = item["input_ids"].shape[0]
            span = slice(longest - length, longest) if self.padding_side == "left" else slice(0, length)
            input_ids[row, span] = item["input_ids"]
            labels[row, span] = item["labels"]
            attention_mask[row, span] = 1
            for key in SEQUENCE_KEYS:
                if key in item:
                    sequences.setdefault(key, torch.zeros((n, longest), dtype=item[key].dtype))[row, span] = item[key][0]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                                 "task_ids": torch.tensor([item["task_id"] for item in batch_items], dtype=torch.long),
                                 **sequences}
        image_keys = sorted({k for item in batch_items for k in item} - set(batch) - {"task_id", *SEQUENCE_KEYS})
        for key in image_keys:
            tensors = [item[key] for item in batch_items if key in item]
            shapes = {tuple(t.shape[1:]) for t in tensors}
            if len(shapes) > 1:
                raise DataError(f"cannot batch {key!r} with shapes {sorted(shapes)}; use per_device_train_batch_size=1 "
                                "or equal-sized images for this model family")
            batch[key] = torch.cat(tensors, dim=0)
        return batch


def estimate_length(sample: Any, image_tokens: int) -> int:
    """Cheap length estimate (for group-by-length sampling): text characters / 4 + image tokens."""
    text = sum(len(m["content"]) if isinstance(m["content"], str) else 0 for m in sample.messages)
    return text // 4 + image_tokens * len(sample.images)
