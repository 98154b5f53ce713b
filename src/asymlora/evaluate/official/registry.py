"""The six official benchmarks by name: each one's reader, the response-format suffix LLaVA-1.5 appends
to its questions and the metric that scores it.

:data:`PROMPTS` holds the suffixes (one line after the question; :func:`build_prompt`), :data:`METRICS`
names the metric that scores each benchmark and :func:`score_benchmark` computes it from the items and the
model outputs; :func:`read_benchmark` reads one with its reader (:mod:`asymlora.evaluate.official.readers`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asymlora.evaluate.metrics.gqa import gqa_scores
from asymlora.evaluate.metrics.mme import mme_scores
from asymlora.evaluate.metrics.pope import pope_scores, pope_scores_by_category
from asymlora.evaluate.metrics.scienceqa import scienceqa_scores
from asymlora.evaluate.metrics.vqa import vqa_accuracy_batch
from asymlora.evaluate.official.items import EvalItem, PathLike
from asymlora.evaluate.official.readers import (
    read_gqa,
    read_mme,
    read_pope,
    read_scienceqa,
    read_textvqa,
    read_vizwiz,
)

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
VIZWIZ_PROMPT = (
    "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER_PROMPT
)
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its reader, LLaVA-1.5 prompt suffix and the metric that scores it."""

    name: str
    reader: Callable[..., list[EvalItem]]
    prompt: str
    metric: str


BENCHMARKS: dict[str, Benchmark] = {
    "textvqa": Benchmark("textvqa", read_textvqa, SHORT_ANSWER_PROMPT,
                         "VQA accuracy, m4c normalisation (metrics.vqa.vqa_accuracy_batch)"),
    "gqa": Benchmark("gqa", read_gqa, SHORT_ANSWER_PROMPT,
                     "GQA exact match, binary/open, distribution (metrics.gqa.gqa_scores)"),
    "vizwiz": Benchmark("vizwiz", read_vizwiz, VIZWIZ_PROMPT,
                        "VQA accuracy, m4c normalisation (metrics.vqa.vqa_accuracy_batch)"),
    "scienceqa": Benchmark("scienceqa", read_scienceqa, MULTIPLE_CHOICE_PROMPT,
                           "option-letter accuracy, LLaVA parsing (metrics.scienceqa.scienceqa_scores)"),
    "mme": Benchmark("mme", read_mme, SHORT_ANSWER_PROMPT,
                     "acc + acc+ per subtask, perception/cognition totals (metrics.mme.mme_scores)"),
    "pope": Benchmark("pope", read_pope, SHORT_ANSWER_PROMPT,
                      "accuracy, precision, recall, F1, yes-ratio per category (metrics.pope)"),
}  # fmt: skip
READERS: dict[str, Callable[..., list[EvalItem]]] = {name: b.reader for name, b in BENCHMARKS.items()}
PROMPTS: dict[str, str] = {name: b.prompt for name, b in BENCHMARKS.items()}
METRICS: dict[str, str] = {name: b.metric for name, b in BENCHMARKS.items()}


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def read_benchmark(
    name: str,
    data_path: PathLike,
    image_root: PathLike | None = None,
    limit: int | None = None,
    **options: Any,
) -> list[EvalItem]:
    """Read benchmark ``name`` (a key of :data:`READERS`); ``limit`` keeps the first items in file order.

    ``options`` go to the reader: ``check_images`` (all), ``split`` (scienceqa), ``subtasks`` (mme).
    """
    return _benchmark(name).reader(data_path, image_root=image_root, limit=limit, **options)


def build_prompt(name: str, item: EvalItem) -> str:
    """The question followed, on a new line, by the benchmark's response-format suffix (never twice)."""
    suffix = _benchmark(name).prompt
    question = item.question.rstrip()
    return question if question.endswith(suffix) else f"{question}\n{suffix}"


def _aligned_predictions(
    items: Sequence[EvalItem], predictions: Sequence[str] | Mapping[str, str]
) -> list[str]:
    if isinstance(predictions, Mapping):
        missing = [item.id for item in items if item.id not in predictions]
        if missing:
            raise ValueError(f"no prediction for {len(missing)} item(s), e.g. {missing[:3]}")
        return [predictions[item.id] for item in items]
    if isinstance(predictions, str) or len(predictions) != len(items):
        raise ValueError(f"expected one prediction per item ({len(items)}), got {len(predictions)}")
    return list(predictions)


def score_benchmark(
    name: str, items: Sequence[EvalItem], predictions: Sequence[str] | Mapping[str, str]
) -> dict[str, Any]:
    """Score model outputs on a benchmark's items with its official metric (see :data:`METRICS`).

    ``predictions`` are the raw model outputs, in item order or keyed by item id. The result is the metric
    function's dict (fractions in [0, 1]; MME scores in points) with ``"benchmark"`` added.
    """
    _benchmark(name)
    if not items:
        raise ValueError(f"no {name} items to score")
    outputs = _aligned_predictions(items, predictions)
    result: dict[str, Any]
    if name in ("textvqa", "vizwiz"):
        unscored = [item.id for item in items if not item.answers]
        if unscored:
            raise ValueError(
                f"{len(unscored)} {name} item(s) have no human answers (e.g. {unscored[0]}): a test split is "
                "scored by the evaluation server"
            )
        result = vqa_accuracy_batch(outputs, [item.answers for item in items])
    elif name == "gqa":
        result = gqa_scores(
            outputs,
            [item.answers[0] for item in items],
            structural_types=[item.extra.get("structural") for item in items],
            global_groups=[item.extra.get("global_group") for item in items],
            balanced=[item.extra.get("is_balanced", True) for item in items],
        )
    elif name == "scienceqa":
        result = scienceqa_scores(
            outputs,
            [item.extra["answer_index"] for item in items],
            [item.extra["num_choices"] for item in items],
            has_image=[item.image is not None for item in items],
        )
    elif name == "mme":
        result = mme_scores(
            outputs,
            [item.answers[0] for item in items],
            [item.extra["subtask"] for item in items],
            [item.extra["image_key"] for item in items],
        )
    else:
        labels = [item.answers[0] for item in items]
        result = pope_scores_by_category(outputs, labels, [item.extra["category"] for item in items])
        overall = pope_scores(outputs, labels)
        overall.pop("per_question")
        result["overall"] = overall
    return {"benchmark": name, **result}
