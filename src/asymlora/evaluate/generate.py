"""Batched generation for evaluation: greedy by default, one task id per sample.

Prompts are the sample's conversation up to (not including) its last assistant reply, rendered by
the processor's chat template with the generation prompt, so every supported family gets its own
format. Works with an :class:`~asymlora.model.AsymLoraModel` (task ids route the adapter) and with a
plain Hugging Face model (e.g. a merged task model), which takes no task ids. A sample's ``images`` are file
paths or PIL images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from asymlora.config import IMAGE_TOKEN
from asymlora.data.collator import load_image, to_conversation


def prompt_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """(messages before the last assistant reply, that reply or None)."""
    messages = list(messages)
    if messages and messages[-1]["role"] == "assistant":
        content = messages[-1]["content"]
        return messages[:-1], content if isinstance(content, str) else None
    return messages, None


def prompt_text(processor: Any, messages: Sequence[dict[str, Any]]) -> str:
    """``messages`` (string content with ``<image>`` placeholders) rendered by the processor's chat
    template, ending with the generation prompt: the text the model continues with its answer."""
    return processor.apply_chat_template(to_conversation(messages), tokenize=False, add_generation_prompt=True)


def sample_images(sample: Any) -> list[Any]:
    """The sample's images as RGB PIL images (file paths are read, PIL images converted)."""
    return [load_image(image, getattr(sample, "source", "")) if isinstance(image, (str, os.PathLike))
            else image.convert("RGB") for image in sample.images]


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    tasks: Sequence[str] = (),
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers (decoded, stripped) for each sample's last user turn.

    ``tasks``: the adapter's task names; a sample's ``task`` routes it by its index there (-1 when absent).
    ``generate_kwargs`` go to ``model.generate`` after the defaults, e.g. ``do_sample=True, temperature=0.7``.
    """
    from tqdm.auto import tqdm

    from asymlora.model import AsymLoraModel

    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    task_index = {name: i for i, name in enumerate(tasks)}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    steps = range(0, len(samples), batch_size)
    for start in tqdm(steps, desc="generating", unit="batch", disable=not progress):
        batch = samples[start:start + batch_size]
        texts, images, task_ids = [], [], []
        for sample in batch:
            messages, _ = prompt_messages(sample.messages)
            texts.append(prompt_text(processor, messages))
            images.extend(sample_images(sample))
            task_ids.append(task_index.get(getattr(sample, "task", None), -1))
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in processor(**kwargs).items()}
        options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad_id, **generate_kwargs}
        if isinstance(model, AsymLoraModel):
            options["task_ids"] = torch.tensor(task_ids, dtype=torch.long, device=device)
        output = model.generate(**inputs, **options)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return answers


@torch.no_grad()
def rank_candidates(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    candidates: Sequence[str],
    tasks: Sequence[str] = (),
    progress: bool = True,
    calibrate: bool = False,
) -> list[str]:
    """Closed-set answers: for each sample, the candidate with the highest summed log-likelihood as the
    assistant reply (every candidate scored with the sample's image and prompt, one forward per sample).

    This measures what the model knows about the image independently of whether it follows the
    answer format, which is how a model that was only aligned (stage 1) can be evaluated. With
    ``calibrate=True`` the score is log p(answer | image, prompt) - log p(answer | prompt without the
    image), which removes the language model's answer prior and keeps what the image adds.
    """
    from tqdm.auto import tqdm

    from asymlora.model import AsymLoraModel

    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "right"
    task_index = {name: i for i, name in enumerate(tasks)}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen: list[str] = []
    for sample in tqdm(samples, desc="ranking", unit="sample", disable=not progress):
        messages, _ = prompt_messages(sample.messages)
        prompt = processor.apply_chat_template(to_conversation(messages), tokenize=False, add_generation_prompt=True)
        images = [load_image(p, getattr(sample, "source", "")) for p in sample.images]
        kwargs: dict[str, Any] = {"text": [prompt + c for c in candidates], "return_tensors": "pt", "padding": True}
        prompt_kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images * len(candidates)
            prompt_kwargs["images"] = images
        options = {}
        if isinstance(model, AsymLoraModel):
            task_id = task_index.get(getattr(sample, "task", None), -1)
            options["task_ids"] = torch.full((len(candidates),), task_id, dtype=torch.long, device=device)
        scores = _answer_logprobs(model, processor, kwargs, prompt_kwargs, options, device)
        if calibrate and images:
            text_only = [{**m, "content": m["content"].replace(IMAGE_TOKEN, "")} for m in messages]
            bare = processor.apply_chat_template(to_conversation(text_only), tokenize=False,
                                                 add_generation_prompt=True)
            scores = scores - _answer_logprobs(
                model, processor, {"text": [bare + c for c in candidates], "return_tensors": "pt", "padding": True},
                {"text": [bare], "return_tensors": "pt"}, options, device)
        chosen.append(candidates[int(scores.argmax())])
    model.train(was_training)
    return chosen


def _answer_logprobs(model: Any, processor: Any, kwargs: dict[str, Any], prompt_kwargs: dict[str, Any],
                     options: dict[str, Any], device: Any) -> torch.Tensor:
    """Summed log-probability of each sequence's tokens after the prompt (one row per candidate)."""
    start = processor(**prompt_kwargs)["input_ids"].shape[1]
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in processor(**kwargs).items()}
    logits = model(**inputs, **options).logits.float()
    targets = inputs["input_ids"][:, 1:]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = inputs["attention_mask"][:, 1:].bool()
    mask[:, : start - 1] = False
    return (logprobs * mask).sum(dim=1)
