"""POPE: accuracy, precision, recall, F1 and yes-ratio of yes/no object-presence answers.

Source: the POPE evaluation (``evaluate.py`` of RUCAIBox/POPE), as copied into LLaVA as
``llava/eval/eval_pope.py`` and run per category (``random``, ``popular``, ``adversarial``) for LLaVA-1.5.
Independent implementation.

Official yes/no parsing (:func:`parse_yes_no`)::

    text  = output up to its first "." (only the first sentence is kept)
    text  = text with every "," deleted
    words = text.split(" ")                     # split on single spaces, not on all whitespace
    label = "no" if "No" in words or "not" in words or "no" in words else "yes"

Everything that is not recognised as a no counts as a **yes**. Quirks reproduced: ``"NO"``, ``"Nope"``,
``"No!"``, ``"no\\n"`` (attached punctuation other than ``,``/``.``, other case, newline) and an empty output
are yes; ``"There is no dog"`` is no; a "no" after the first period is ignored (``"Yes. No."`` is yes).
Gold labels: ``"no"`` is negative, anything else positive (the official rule; the reader only accepts
``yes``/``no``).

Metrics, with yes as the positive class::

    accuracy  = (TP + TN) / (TP + TN + FP + FN)
    precision = TP / (TP + FP)          recall = TP / (TP + FN)
    f1        = 2 * precision * recall / (precision + recall)
    yes_ratio = #{predicted yes} / #questions

The official script divides by zero when a denominator is 0; here such a ratio is 0.0 (f1 too).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_yes_no", "pope_scores", "pope_scores_by_category"]

_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_yes_no(text: str) -> str:
    """``"yes"`` or ``"no"`` by the official POPE rule (see the module docstring)."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, yes-ratio (fractions) and the confusion counts over one question set.

    Returns ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn", "count",
    "per_question"}``; ``per_question`` is 1.0 where the parsed answer equals the label.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        raise ValueError("no questions to score")
    predicted_yes = [parse_yes_no(p) == "yes" for p in predictions]
    gold_yes = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(predicted_yes, gold_yes))
    fp = sum(p and not g for p, g in zip(predicted_yes, gold_yes))
    tn = sum(not p and not g for p, g in zip(predicted_yes, gold_yes))
    fn = sum(not p and g for p, g in zip(predicted_yes, gold_yes))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(predictions),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(predicted_yes) / len(predictions),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "count": len(predictions),
        "per_question": [float(p == g) for p, g in zip(predicted_yes, gold_yes)],
    }


def pope_scores_by_category(
    predictions: Sequence[str], labels: Sequence[str], categories: Sequence[str]
) -> dict[str, Any]:
    """:func:`pope_scores` per category (as LLaVA reports POPE) and their unweighted mean.

    Returns ``{"categories": {name: scores}, "mean": {metric: mean over categories}, "per_question"}``.
    """
    if not len(predictions) == len(labels) == len(categories):
        raise ValueError("predictions, labels and categories must have the same length")
    if not predictions:
        raise ValueError("no questions to score")
    rows: dict[str, list[int]] = defaultdict(list)
    for index, category in enumerate(categories):
        rows[category].append(index)
    per_category: dict[str, dict[str, Any]] = {}
    per_question = [0.0] * len(predictions)
    for category, indices in rows.items():
        result = pope_scores([predictions[i] for i in indices], [labels[i] for i in indices])
        for i, value in zip(indices, result["per_question"]):
            per_question[i] = value
        per_category[category] = result
    mean = {m: sum(r[m] for r in per_category.values()) / len(per_category) for m in _METRICS}
    return {"categories": per_category, "mean": mean, "count": len(predictions), "per_question": per_question}
