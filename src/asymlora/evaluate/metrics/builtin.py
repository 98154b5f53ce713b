"""Metrics of asymlora's built-in tasks (one reference answer per sample) and the task -> metric registry.

=====================  ==============================================================  ===========  =======
metric                 definition                                                      range        better
=====================  ==============================================================  ===========  =======
exact_match            ``normalize_text(prediction) == normalize_text(reference)``     0 or 1       higher
first_word_match       the first ``k`` words of the normalised prediction (edge        0 or 1       higher
                       punctuation removed) equal the ``k`` words of the normalised
                       reference; ``k`` = 1 for one-word answers ("Blue, it is blue."
                       matches "blue")
vqa_match              VQA-style accuracy with a single reference: 1 if the EvalAI     0 or 1       higher
                       normalisations (:func:`~asymlora.evaluate.metrics.vqa.
                       normalize_answer`) of prediction and reference are equal
character_error_rate   Levenshtein distance (unit-cost insert, delete, substitute,     [0, inf)     lower
                       over Unicode characters) / reference length, on the strings
                       with surrounding whitespace stripped, case-sensitive
rouge_l                ROUGE-L F-measure (beta = 1) of the token-level longest        [0, 1]       higher
                       common subsequence: P = LCS/len(pred), R = LCS/len(ref),
                       F = 2PR/(P+R)
=====================  ==============================================================  ===========  =======

:func:`normalize_text`: Unicode NFKC, lower-case, whitespace runs -> one space, then leading and trailing
punctuation (Unicode category P*) and spaces removed (``"Ankle boot."`` -> ``"ankle boot"``; inner
punctuation such as the hyphen of ``"T-shirt"`` is kept).

ROUGE-L tokens: the lower-cased text split into maximal runs of letters and digits (any script), i.e. the
tokenisation of Google's ``rouge-score`` (lower-case, non-alphanumerics are separators) extended to non-ASCII
letters, without stemming. Sources: Lin (2004), "ROUGE: A Package for Automatic Evaluation of Summaries"
(ROUGE-L, LCS-based F-measure); Levenshtein (1966) for the edit distance. Both are implemented here (no
dependency). An empty reference gives CER 0.0 for an empty prediction and 1.0 otherwise; empty token
lists give ROUGE-L 1.0 when both are empty and 0.0 otherwise.

Registry (:data:`TASK_METRICS`): easyvqa and fashion (short answers: a colour, a shape, a class
name) -> ``vqa_match``; digits (a digit) and emoji (a category name) -> ``exact_match``; ocr (the exact
word) -> ``character_error_rate``. :func:`score_task` returns the primary metric
plus exact match.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from asymlora.evaluate.metrics.vqa import normalize_answer

__all__ = [
    "LOWER_IS_BETTER",
    "METRICS",
    "TASK_METRICS",
    "character_error_rate",
    "exact_match",
    "first_word_match",
    "levenshtein",
    "normalize_text",
    "rouge_l",
    "rouge_l_tokens",
    "score_task",
    "vqa_match",
]

_TOKEN = re.compile(r"[^\W_]+")


def _strip_punctuation(text: str) -> str:
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def normalize_text(s: str) -> str:
    """NFKC, lower-case, collapsed whitespace, leading/trailing punctuation and spaces removed."""
    return _strip_punctuation(" ".join(unicodedata.normalize("NFKC", s).lower().split()))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if prediction and reference are equal after :func:`normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def first_word_match(prediction: str, reference: str) -> float:
    """1.0 if the prediction starts with the reference's words (edge punctuation of each word ignored)."""
    reference_words = [_strip_punctuation(w) for w in normalize_text(reference).split()]
    if not reference_words:
        return exact_match(prediction, reference)
    prediction_words = [_strip_punctuation(w) for w in normalize_text(prediction).split()]
    return float(prediction_words[: len(reference_words)] == reference_words)


def vqa_match(prediction: str, reference: str) -> float:
    """VQA-style accuracy for a single reference: equality after the EvalAI answer normalisation."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (unit-cost insertions, deletions, substitutions) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, item_a in enumerate(a, start=1):
        current = [i]
        for j, item_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item_a != item_b)))
        previous = current
    return previous[-1]


def character_error_rate(prediction: str, reference: str) -> float:
    """Levenshtein distance / reference length over characters (case-sensitive; lower is better)."""
    prediction, reference = prediction.strip(), reference.strip()
    if not reference:
        return 0.0 if not prediction else 1.0
    return levenshtein(prediction, reference) / len(reference)


def rouge_l_tokens(text: str) -> list[str]:
    """ROUGE-L tokens: lower-cased maximal runs of letters and digits."""
    return _TOKEN.findall(text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for item_a in a:
        current = [0]
        for j, item_b in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if item_a == item_b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (token-level LCS, beta = 1)."""
    predicted, gold = rouge_l_tokens(prediction), rouge_l_tokens(reference)
    if not predicted or not gold:
        return float(not predicted and not gold)
    lcs = _lcs_length(predicted, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "first_word_match": first_word_match,
    "vqa_match": vqa_match,
    "character_error_rate": character_error_rate,
    "rouge_l": rouge_l,
}
LOWER_IS_BETTER: frozenset[str] = frozenset({"character_error_rate"})

TASK_METRICS: dict[str, Callable[[str, str], float]] = {
    "easyvqa": vqa_match,
    "fashion": vqa_match,
    "digits": exact_match,
    "emoji": exact_match,
    "ocr": character_error_rate,
}


def score_task(
    task: str, predictions: Sequence[str], references: Sequence[str], metric: str | None = None
) -> dict[str, Any]:
    """Score a built-in task: its primary metric (or ``metric``, a name in :data:`METRICS`) and exact match.

    Returns ``{"task", "metric": name, <name>: mean, "exact_match": mean, "higher_is_better", "count",
    "per_sample": [primary metric of each sample]}``.
    """
    if metric is None:
        if task not in TASK_METRICS:
            raise ValueError(
                f"no metric registered for task {task!r} (known: {', '.join(TASK_METRICS)}); "
                f"pass metric= one of {', '.join(METRICS)}"
            )
        function = TASK_METRICS[task]
        name = function.__name__
    else:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        name, function = metric, METRICS[metric]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError(f"no samples to score for task {task!r}")
    per_sample = [function(p, r) for p, r in zip(predictions, references)]
    exact = [exact_match(p, r) for p, r in zip(predictions, references)]
    return {
        "task": task,
        "metric": name,
        name: sum(per_sample) / len(per_sample),
        "exact_match": sum(exact) / len(exact),
        "higher_is_better": name not in LOWER_IS_BETTER,
        "count": len(per_sample),
        "per_sample": per_sample,
    }
