"""ScienceQA multiple-choice accuracy (the IMG subset: test problems with an image), LLaVA-1.5 protocol.

Source: ``llava/eval/eval_science_qa.py`` of LLaVA (haotian-liu/LLaVA), which produced LLaVA-1.5's
ScienceQA-IMG numbers; its answer parsing derives from ``run_gpt3.py`` of the ScienceQA repository
(lupantech/ScienceQA). Independent implementation.

Official answer parsing (:func:`parse_option`, default ``lenient=False``), on the output as generated
(LLaVA strips it), first branch that applies:

1. the whole output is one of ``A B C D E``                          -> that letter;
2. the output is at least 3 characters, starts with one of ``A``-``E`` followed by ``". "`` -> that letter
   (``"B. Paris"``);
3. the regex ``The answer is ([A-Z]).`` has exactly one match          -> its letter (any capital);
4. otherwise the parse fails (``"FAILED"`` in the official script; ``None`` here).

The letter is then turned into the choice index within ``A``.. up to the number of choices; a failed
parse, or a letter beyond the choices, gives -1, which never equals the answer: **a failure is counted
wrong**. (The original ScienceQA ``run_gpt3.py`` falls back to a random choice; LLaVA's script returns -1
before reaching that line, and that deterministic behaviour is what is reproduced.)

Quirks reproduced: ``"B."`` and ``" B"`` and ``"(B)"`` fail (branch 1 needs the exact letter, branch 2
needs a following space); ``"The answer is B"`` at the very end fails (the regex's ``.`` needs one more
character); two ``The answer is X.`` sentences fail even when they agree.

``lenient=True`` adds branches after the official ones (not official; for models that do not follow the
"letter directly" instruction): after stripping whitespace, ``"(B)"``, ``"B."``, ``"B)"``, ``"B:"`` alone
or followed by text; then ``answer``/``answer is``/``answer:`` followed by a letter, optionally in
parentheses (``"Answer: (C)"``, ``"the correct answer is B"``) when all such matches agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["OPTIONS", "option_index", "parse_option", "scienceqa_correct", "scienceqa_scores"]

OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")

_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_LENIENT_LEADING = re.compile(r"^\(?([A-E])(?:\)|[.:)](?=\s|$)|$)")
_LENIENT_ANSWER = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?:?\s*\(?([A-E])(?![A-Za-z])")


def parse_option(text: str, lenient: bool = False) -> str | None:
    """The option letter in a model output, by the official rules (see the module docstring), or ``None``."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    if not lenient:
        return None
    stripped = text.strip()
    leading = _LENIENT_LEADING.match(stripped)
    if leading:
        return leading.group(1)
    letters = set(_LENIENT_ANSWER.findall(stripped))
    return letters.pop() if len(letters) == 1 else None


def option_index(letter: str | None, num_choices: int) -> int:
    """Index of ``letter`` among the first ``num_choices`` options, or -1 (failed parse or out of range)."""
    if letter is not None and letter in OPTIONS[:num_choices]:
        return OPTIONS.index(letter)
    return -1


def scienceqa_correct(prediction: str, answer_index: int, num_choices: int, lenient: bool = False) -> float:
    """1.0 if the parsed option is the answer (index into the choices), else 0.0 (parse failures included)."""
    return float(option_index(parse_option(prediction, lenient), num_choices) == answer_index)


def scienceqa_scores(
    predictions: Sequence[str],
    answer_indices: Sequence[int],
    num_choices: Sequence[int],
    has_image: Sequence[bool] | None = None,
    lenient: bool = False,
) -> dict[str, Any]:
    """Accuracy over a set of problems.

    Returns ``{"accuracy", "img_accuracy", "failed", "count", "per_question"}``: fractions in [0, 1]
    (LLaVA prints them times 100); ``img_accuracy`` is over the problems with ``has_image`` true (``None``
    when ``has_image`` is not given or none has an image); ``failed`` counts outputs whose parse failed or
    named a letter beyond the choices.
    """
    n = len(predictions)
    if len(answer_indices) != n or len(num_choices) != n or (has_image is not None and len(has_image) != n):
        raise ValueError("predictions, answer_indices, num_choices (and has_image) must have the same length")
    if n == 0:
        raise ValueError("no problems to score")
    indices = [option_index(parse_option(p, lenient), k) for p, k in zip(predictions, num_choices)]
    per_question = [float(i == a) for i, a in zip(indices, answer_indices)]
    img_accuracy = None
    if has_image is not None:
        with_image = [s for s, image in zip(per_question, has_image) if image]
        img_accuracy = sum(with_image) / len(with_image) if with_image else None
    return {
        "accuracy": sum(per_question) / n,
        "img_accuracy": img_accuracy,
        "failed": sum(i == -1 for i in indices),
        "count": n,
        "per_question": per_question,
    }
