"""GQA: exact-match accuracy (overall, binary, open) and the distribution score.

Source: the official GQA evaluation script ``eval.py`` (Hudson & Manning, gqadataset.org), as LLaVA-1.5 runs
it on ``testdev_balanced`` after converting its answers with ``llava/eval/convert_gqa_for_eval.py``. This
module is an independent implementation of those definitions.

Normalisation. The official script compares strings as they are (``predicted == gold``); LLaVA's converter
first turns each (already whitespace-stripped) model output into ``text.rstrip('.').lower()``.
:func:`normalize_gqa_answer` does exactly that (strip, trailing periods removed, lower-case) to the
prediction. Gold answers are used as they are (GQA answers are lower-case words).

Semantics::

    correct(q)   = 1 if normalize(prediction_q) == gold_q else 0
    accuracy     = mean over the balanced questions of correct(q)
    open         = mean over questions whose types.structural == "query"
    binary       = mean over the other questions (structural "verify", "logical", "choose", "compare")

    distribution: for each global group g (``groups.global``; questions whose group is null are skipped)
        G_g[a] = number of questions of g whose gold answer is a
        P_g[a] = number of questions of g whose (normalised) prediction is a
        chi_g  = sum over the gold answers a of g of (P_g[a] - G_g[a])^2 / G_g[a]
        n_g    = sum_a G_g[a]
    distribution = (sum_g n_g * chi_g) / (sum_g n_g) / 100            (lower is better)

i.e. a per-group chi-square statistic of the predicted answer histogram against the gold one, averaged over
groups weighted by group size, divided by 100 (the official script prints it as is, "lower is better").
Quirk reproduced: a predicted answer that is no gold answer of its group does not enter the sum at all
(predicting "purple" where the group's gold answers are "red" and "blue" only costs through the missing
"red" or "blue"); the score therefore only sees how the gold answers are under- or over-predicted.

Accuracies are returned as fractions in [0, 1] (the official script prints them times 100). Consistency,
validity, plausibility and grounding need files beyond the testdev questions (entailed questions,
choices, attention maps) and are not implemented.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

__all__ = ["gqa_distribution", "gqa_exact_match", "gqa_scores", "normalize_gqa_answer"]


def normalize_gqa_answer(s: str) -> str:
    """LLaVA's ``convert_gqa_for_eval``: whitespace stripped, trailing periods removed, lower-cased."""
    return s.strip().rstrip(".").lower()


def gqa_exact_match(prediction: str, answer: str) -> float:
    """1.0 if the normalised prediction equals the gold answer (as given), else 0.0."""
    return float(normalize_gqa_answer(prediction) == answer)


def gqa_distribution(
    gold_answers: Sequence[str], predicted_answers: Sequence[str], groups: Sequence[Hashable | None]
) -> float:
    """The official distribution score (chi-square / 100, lower is better); see the module docstring.

    ``predicted_answers`` are compared as given (normalise them first). Questions whose group is ``None`` are
    skipped, as in the official script.
    """
    if not len(gold_answers) == len(predicted_answers) == len(groups):
        raise ValueError(
            f"lengths differ: {len(gold_answers)} gold, {len(predicted_answers)} predicted, "
            f"{len(groups)} groups"
        )
    gold_histograms: dict[Hashable, Counter[str]] = defaultdict(Counter)
    predicted_histograms: dict[Hashable, Counter[str]] = defaultdict(Counter)
    for gold, predicted, group in zip(gold_answers, predicted_answers, groups):
        if group is None:
            continue
        gold_histograms[group][gold] += 1
        predicted_histograms[group][predicted] += 1
    if not gold_histograms:
        raise ValueError("no question has a global group: the distribution score is undefined")
    weighted_sum, total = 0.0, 0
    for group, gold_histogram in gold_histograms.items():
        predicted_histogram = predicted_histograms[group]
        chi_square = sum(
            (predicted_histogram.get(answer, 0) - expected) ** 2 / expected
            for answer, expected in gold_histogram.items()
        )
        size = sum(gold_histogram.values())
        weighted_sum += chi_square * size
        total += size
    return weighted_sum / total / 100


def gqa_scores(
    predictions: Sequence[str],
    answers: Sequence[str],
    structural_types: Sequence[str | None] | None = None,
    global_groups: Sequence[Hashable | None] | None = None,
    balanced: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """GQA scores over a set of questions.

    ``answers`` are the gold answers; ``structural_types`` (``types.structural``; ``None`` for a question
    without) enables ``binary`` and ``open``; ``global_groups`` (``groups.global``) enables
    ``distribution``; ``balanced`` (``isBalanced``) restricts every aggregate to the balanced questions, as
    the official script does (all of testdev-balanced is balanced).

    Returns ``{"accuracy", "binary", "open", "distribution", "count", "per_question"}``; a metric whose
    inputs are missing (or that has no question) is ``None``. ``per_question`` holds the exact-match score
    of every question given, balanced or not.
    """
    n = len(predictions)
    for name, values in (("answers", answers), ("structural_types", structural_types),
                         ("global_groups", global_groups), ("balanced", balanced)):  # fmt: skip
        if values is not None and len(values) != n:
            raise ValueError(f"{n} predictions but {len(values)} {name}")
    if n == 0:
        raise ValueError("no questions to score")
    normalised = [normalize_gqa_answer(p) for p in predictions]
    per_question = [float(p == a) for p, a in zip(normalised, answers)]
    kept = [i for i in range(n) if balanced is None or balanced[i]]
    if not kept:
        raise ValueError("no balanced question to score")

    def mean(indices: list[int]) -> float | None:
        return sum(per_question[i] for i in indices) / len(indices) if indices else None

    result: dict[str, Any] = {"accuracy": mean(kept), "binary": None, "open": None, "distribution": None}
    if structural_types is not None:
        result["open"] = mean([i for i in kept if structural_types[i] == "query"])
        result["binary"] = mean([i for i in kept if structural_types[i] not in (None, "query")])
    if global_groups is not None and any(global_groups[i] is not None for i in kept):
        result["distribution"] = gqa_distribution(
            [answers[i] for i in kept], [normalised[i] for i in kept], [global_groups[i] for i in kept]
        )
    result["count"] = len(kept)
    result["per_question"] = per_question
    return result
