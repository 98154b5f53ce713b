"""MME: per-subtask accuracy and accuracy+, perception and cognition totals.

Source: the official MME evaluation tool ``eval_tool/calculation.py`` (BradyFU/Awesome-Multimodal-Large-
Language-Models, branch ``Evaluation``), which LLaVA-1.5 runs after ``convert_answer_to_mme.py``.
Independent implementation.

Semantics, per subtask::

    label(output) = parse_yes_no(output)                 # "yes" / "no" / "other"
    acc           = #{questions with label == gold} / #questions        ("other" is always wrong)
    acc_plus      = #{images whose questions are all right} / #images    (MME has 2 questions per image)
    score         = 100 * acc + 100 * acc_plus                           (max 200)

    perception = sum of the scores of the 10 perception subtasks   (max 2000)
    cognition  = sum of the scores of the 4 cognition subtasks     (max 800)

Official yes/no parsing (:func:`parse_yes_no`): the output is lower-cased (not stripped); if it is exactly
``yes`` or ``no`` that is the label; otherwise its first 4 characters are searched for ``yes`` (first) then
``no``; else ``other``. Quirks reproduced: ``"not sure"`` and ``"none"`` are ``no`` ("no" is in the first four
characters), ``"No, yes"`` is ``no``, ``"I think yes"`` and ``"  yes"`` (leading spaces) are ``other``. Gold
answers (``Yes``/``No`` in the files) are lower-cased and must be ``yes`` or ``no``.

The official tool pairs consecutive lines of each result file and asserts two per image; here questions are
grouped by an explicit image key, and an image counts for acc+ when all of its questions are right (the same
thing for MME's two questions per image; also defined for a ``limit``-ed run with one). The tool also
prints precision/recall (over non-"other" outputs); they do not enter the score and are not computed here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

__all__ = [
    "COGNITION_SUBTASKS",
    "PERCEPTION_SUBTASKS",
    "SUBTASKS",
    "mme_scores",
    "mme_subtask_score",
    "parse_yes_no",
]

PERCEPTION_SUBTASKS: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION_SUBTASKS: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip
SUBTASKS: tuple[str, ...] = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS


def parse_yes_no(text: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` by the official MME rule (see the module docstring)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _gold_label(answer: str) -> str:
    label = answer.strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"MME gold answers are yes or no, got {answer!r}")
    return label


def mme_subtask_score(
    predictions: Sequence[str], answers: Sequence[str], image_keys: Sequence[Hashable]
) -> dict[str, Any]:
    """acc, acc_plus (fractions), score (= 100*acc + 100*acc_plus), other (count of unparsable outputs)."""
    if not len(predictions) == len(answers) == len(image_keys):
        raise ValueError("predictions, answers and image_keys must have the same length")
    if not predictions:
        raise ValueError("no questions to score")
    per_image: dict[Hashable, list[bool]] = defaultdict(list)
    correct, other = [], 0
    for prediction, answer, key in zip(predictions, answers, image_keys):
        label = parse_yes_no(prediction)
        other += label == "other"
        right = label == _gold_label(answer)
        correct.append(right)
        per_image[key].append(right)
    acc = sum(correct) / len(correct)
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    return {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": 100 * acc + 100 * acc_plus,
        "other": other,
        "questions": len(correct),
        "images": len(per_image),
        "per_question": [float(c) for c in correct],
    }


def mme_scores(
    predictions: Sequence[str],
    answers: Sequence[str],
    subtasks: Sequence[str],
    image_keys: Sequence[Hashable],
) -> dict[str, Any]:
    """Every subtask's scores and the two totals.

    Returns ``{"perception", "cognition", "total", "subtasks": {name: mme_subtask_score(...)},
    "missing_subtasks": [...], "per_question"}``. ``perception``/``cognition`` sum the subtasks present (the
    official maxima 2000/800 assume all 10/4); subtasks of the official lists that have no question are listed
    in ``missing_subtasks``. A subtask name outside the official lists is an error.
    """
    n = len(predictions)
    if not len(answers) == len(subtasks) == len(image_keys) == n:
        raise ValueError("predictions, answers, subtasks and image_keys must have the same length")
    unknown = sorted(set(subtasks) - set(SUBTASKS))
    if unknown:
        raise ValueError(f"unknown MME subtask(s) {unknown}; expected names from {list(SUBTASKS)}")
    rows: dict[str, list[int]] = defaultdict(list)
    for index, subtask in enumerate(subtasks):
        rows[subtask].append(index)
    per_subtask: dict[str, dict[str, Any]] = {}
    per_question = [0.0] * n
    for subtask in SUBTASKS:
        if subtask not in rows:
            continue
        indices = rows[subtask]
        result = mme_subtask_score(
            [predictions[i] for i in indices], [answers[i] for i in indices], [image_keys[i] for i in indices]
        )
        for i, value in zip(indices, result["per_question"]):
            per_question[i] = value
        per_subtask[subtask] = result
    perception = sum(per_subtask[s]["score"] for s in PERCEPTION_SUBTASKS if s in per_subtask)
    cognition = sum(per_subtask[s]["score"] for s in COGNITION_SUBTASKS if s in per_subtask)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "subtasks": per_subtask,
        "missing_subtasks": [s for s in SUBTASKS if s not in per_subtask],
        "count": n,
        "per_question": per_question,
    }
