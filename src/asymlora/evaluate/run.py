"""Evaluation runs: load a model (and adapter) for evaluation, generate answers, score them.

Built-in tasks are scored on their test split with the metrics of
:mod:`asymlora.evaluate.metrics.builtin`; official benchmarks (``--bench textvqa --data PATH``) with
their official metric (:mod:`asymlora.evaluate.official`). A trained adapter is used with its task
routing, or merged for one task (``--merge-task``), which must give the same answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asymlora.config import IMAGE_TOKEN
from asymlora.errors import ConfigError

MAX_CLOSED_ANSWERS = 50  # tasks with at most this many distinct train answers get majority baselines


@dataclass
class _Prompt:
    """A sample-like prompt for generate_answers."""

    messages: list[dict[str, str]]
    images: list[Path] = field(default_factory=list)
    task: str | None = None
    source: str = ""


def trained_config(adapter: str | Path) -> dict[str, Any]:
    """The training config an adapter was trained with: the ``train_config.yaml`` that ``asymlora train`` writes
    to its output dir, read from the run's dir for a ``checkpoint-N`` dir inside it; ``{}`` when there is none
    (an adapter saved by ``save_pretrained``)."""
    from asymlora.io import read_yaml

    config_file = Path(adapter) / "train_config.yaml"
    if not config_file.is_file() and Path(adapter).name.startswith("checkpoint-"):
        config_file = Path(adapter).parent / "train_config.yaml"  # a checkpoint inside a training run
    if not config_file.is_file():
        return {}
    values = read_yaml(config_file, "the training config of the adapter's run") or {}
    if not isinstance(values, dict) or not isinstance(values.get("model") or {}, dict):
        raise ConfigError(f"{config_file}: expected the training config of the adapter's run, a mapping with a "
                          f"'model' section; got {values!r:.80}")
    return values


def base_for_adapter(adapter: str | Path | None, model: str | None = None, projector: str | None = None,
                     quantization: Any = "auto") -> tuple[str, str | None, Any]:
    """(base model, projector, quantization) to load under ``adapter``: ``model`` and ``projector`` where
    given and ``quantization`` unless ``"auto"``, else the ones in the adapter's training config
    (:func:`trained_config`), else the default model without a projector, in float. ``model`` is a name of
    :func:`asymlora.loading.resolve_model_dir` ('default', 'tiny') or a local dir."""
    trained = (trained_config(adapter).get("model") or {}) if adapter else {}
    model = model if model is not None else trained.get("path")
    projector = projector if projector is not None else trained.get("projector")
    if quantization == "auto":
        quantization = trained.get("quantization")
    return model or "default", projector, quantization


def load_for_eval(model: str | None = None, projector: str | None = None, adapter: str | None = None,
                  merge_task: str | None = None, dtype: str = "float32",
                  quantization: Any = "auto") -> tuple[Any, Any, list[str]]:
    """(model ready to generate, processor, adapter task names). ``model``: a name of
    :func:`asymlora.loading.resolve_model_dir` ('default', 'tiny') or a local dir; the base model (None),
    projector and quantization not given here are read from the adapter's training config
    (:func:`trained_config`) when it has one, else the default model without a projector, in float.
    ``quantization``: ``"auto"`` (the training config's), None (float) or an :mod:`asymlora.quantization`
    option."""
    from asymlora.loading import load_model_and_processor

    model, projector, quantization = base_for_adapter(adapter, model, projector, quantization)
    base, processor = load_model_and_processor(model, dtype, projector, quantization)
    tasks: list[str] = []
    if adapter:
        from asymlora.model import load

        wrapped = load(base, adapter, is_trainable=False)
        tasks = list(wrapped.tasks)
        if merge_task is not None:
            wrapped.merge(task=merge_task)
            evaluated: Any = wrapped.base_model  # merged weights; no routing left to do
        else:
            evaluated = wrapped
    elif merge_task is not None:
        raise ConfigError("--merge-task needs --adapter")
    else:
        evaluated = base
    if quantization:  # bitsandbytes placed the weights when loading (device_map)
        return evaluated.eval(), processor, tasks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluated.to(device).eval(), processor, tasks


def _tasks_prompt(sample: Any, suffix: str | None = None) -> _Prompt:
    from asymlora.evaluate.generate import prompt_messages

    messages, _ = prompt_messages(sample.messages)
    if suffix:  # e.g. LLaVA's "Answer the question using a single word or phrase."
        messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"].rstrip() + "\n" + suffix}]
    return _Prompt(messages=messages, images=list(sample.images), task=sample.task, source=sample.source)


def question_template(question: str, answer_words: set[str]) -> str:
    """The question with every word that is itself an answer word replaced by ``_``, lower-cased:
    "What color is the circle?" -> "what color is the _?" when "circle" is an answer of the task. Questions
    with the same template ask for the same kind of answer."""
    import re

    words = re.findall(r"[a-z0-9]+|[^a-z0-9\s]", question.replace(IMAGE_TOKEN, "").lower())
    return " ".join("_" if w in answer_words else w for w in words)


@dataclass
class AnswerPool:
    """A task's train answers, overall and per question template (for closed-set ranking and baselines)."""

    answers: list[str]
    counts: dict[str, int]
    by_template: dict[str, dict[str, int]]
    answer_words: set[str]

    def candidates(self, question: str) -> list[str]:
        """The train answers of ``question``'s template, or all answers for a template never seen in train."""
        seen = self.by_template.get(question_template(question, self.answer_words))
        return sorted(seen) if seen else self.answers

    def majority(self, question: str | None = None) -> str:
        """The most common train answer (of ``question``'s template when given and seen); ties by name."""
        counts = self.counts
        if question is not None:
            counts = self.by_template.get(question_template(question, self.answer_words)) or counts
        return min(counts, key=lambda answer: (-counts[answer], answer))


def answer_pool(pairs: Sequence[tuple[list[dict[str, str]], str | None]]) -> AnswerPool:
    """Build the :class:`AnswerPool` of ``(prompt messages, answer)`` pairs (from ``prompt_messages``)."""
    import re
    from collections import Counter

    answered = [(messages[-1]["content"], answer) for messages, answer in pairs if answer is not None]
    counts = Counter(answer for _, answer in answered)
    answer_words = {w for answer in counts for w in re.findall(r"[a-z0-9]+", answer.lower())}
    by_template: dict[str, Counter] = {}
    for question, answer in answered:
        by_template.setdefault(question_template(question, answer_words), Counter())[answer] += 1
    return AnswerPool(sorted(counts), dict(counts), {k: dict(v) for k, v in by_template.items()}, answer_words)


def evaluate_builtin(model: Any, processor: Any, tasks: Sequence[str], adapter_tasks: Sequence[str] = (),
                     split: str = "test", max_samples: int | None = None, batch_size: int = 16,
                     max_new_tokens: int = 32, merged_task: str | None = None,
                     mixture: str = "mix5", prompt_suffix: str | None = None, scoring: str = "generate",
                     candidates: str = "task", images: str = "own") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-task scores and per-sample predictions on the built-in test splits.

    ``images="shuffled"`` is the blind control: each question is asked about the image of another test
    sample of the same task (a fixed rotation by half the list, skipping samples that share the image), so
    whatever score survives comes from the question alone.

    ``scoring="generate"``: greedy generation. ``scoring="rank"``: the most likely of the task's train
    answers (closed set), for tasks with a small answer vocabulary; with ``candidates="question"`` only
    the train answers of the same question template (:func:`question_template`) compete, and each task's
    results also hold the matching baselines: ``majority`` (the task's most common train answer for every
    question) and ``majority_by_question`` (the most common train answer of the question's template).
    """
    from asymlora.data import load_mixture
    from asymlora.evaluate.generate import generate_answers, prompt_messages, rank_candidates
    from asymlora.evaluate.metrics.builtin import TASK_METRICS, score_task

    loaded = load_mixture(mixture)
    samples = loaded.load(split=split)
    if images not in ("own", "shuffled"):
        raise ConfigError(f"--images: {images!r} is not one of own, shuffled")
    train = loaded.load(split="train")
    results: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    for task in tasks:
        chosen = [s for s in samples if s.task == task][:max_samples] if max_samples else \
            [s for s in samples if s.task == task]
        if not chosen:
            raise ConfigError(f"--tasks: no {split} samples for task {task!r} in mixture {mixture!r}")
        prompts = [_tasks_prompt(s, prompt_suffix) for s in chosen]
        if images == "shuffled":
            _shuffle_images(prompts)
        if merged_task is None and adapter_tasks and task not in adapter_tasks:
            for prompt in prompts:
                prompt.task = None  # unknown to the adapter: -1 (hybrid falls back to the router)
        baselines: dict[str, Any] = {}
        pool = answer_pool([prompt_messages(s.messages) for s in train if s.task == task])
        questions = [prompt_messages(s.messages)[0][-1]["content"] for s in chosen]
        closed = len(pool.answers) <= MAX_CLOSED_ANSWERS
        if closed:  # a closed answer set: the answer-prior baselines
            baselines = {"majority": [pool.majority()] * len(chosen),
                         "majority_by_question": [pool.majority(q) for q in questions]}
        if scoring.startswith("rank"):
            if not closed:
                raise ConfigError(f"--scoring rank: task {task!r} has {len(pool.answers)} distinct answers; ranking "
                                  "is meant for small closed answer sets (use generate)")
            groups: dict[tuple[str, ...], list[int]] = {}
            for i, question in enumerate(questions):
                options = pool.candidates(question) if candidates == "question" else pool.answers
                groups.setdefault(tuple(options), []).append(i)
            answers = [""] * len(chosen)
            for options, indices in groups.items():
                ranked = rank_candidates(model, processor, [prompts[i] for i in indices], list(options),
                                         tasks=adapter_tasks, calibrate=scoring == "rank-calibrated")
                for i, answer in zip(indices, ranked):
                    answers[i] = answer
        else:
            answers = generate_answers(model, processor, prompts, tasks=adapter_tasks, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens)
        references = [prompt_messages(s.messages)[1] or "" for s in chosen]
        # Tasks of user mixtures without a registered metric are scored by normalised exact match.
        scored = score_task(task, answers, references, metric=None if task in TASK_METRICS else "exact_match")
        per_sample = scored.pop("per_sample")
        for name, guesses in baselines.items():
            baseline = score_task(task, guesses, references, metric=scored["metric"])
            scored[name] = baseline[baseline["metric"]]
        results[task] = scored
        predictions.extend({"task": task, "id": s.id, "prediction": a, "reference": r, "score": v}
                           for s, a, r, v in zip(chosen, answers, references, per_sample))
    return results, predictions


def _shuffle_images(prompts: list[_Prompt]) -> None:
    """Give each prompt the images of the prompt half the list away (the next one with other images)."""
    originals = [list(p.images) for p in prompts]
    n = len(prompts)
    for i, prompt in enumerate(prompts):
        for step in range(n):
            other = originals[(i + n // 2 + step) % n]
            if other != originals[i]:
                prompt.images = other
                break


def evaluate_benchmark(model: Any, processor: Any, bench: str, data: str, image_root: str | None = None,
                       limit: int | None = None, batch_size: int = 16, max_new_tokens: int = 32,
                       task: str | None = None, adapter_tasks: Sequence[str] = ()) -> tuple[dict[str, Any], list]:
    from asymlora.evaluate.generate import generate_answers
    from asymlora.evaluate.official.registry import build_prompt, read_benchmark, score_benchmark

    items = read_benchmark(bench, data, image_root=image_root, limit=limit)
    prompts = [_Prompt(messages=[{"role": "user", "content": ("<image>\n" if item.image else "")
                                  + build_prompt(bench, item)}],
                       images=[item.image] if item.image else [], task=task, source=item.id) for item in items]
    answers = generate_answers(model, processor, prompts, tasks=adapter_tasks, batch_size=batch_size,
                               max_new_tokens=max_new_tokens)
    scores = score_benchmark(bench, items, answers)
    predictions = [{"id": item.id, "prediction": a, "answers": item.answers} for item, a in zip(items, answers)]
    return scores, predictions
