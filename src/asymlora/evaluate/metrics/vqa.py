"""VQA accuracy (VQAv2, TextVQA, VizWiz) with the official answer normalisation.

Source: the answer processor and soft accuracy of the EvalAI VQA evaluation as carried by
``EvalAIAnswerProcessor`` / ``TextVQAAccuracyEvaluator`` in ``m4c_evaluator.py`` (facebookresearch
pythia/mmf, copied verbatim into LLaVA as ``llava/eval/m4c_evaluator.py``, which scores TextVQA for
LLaVA-1.5 and processes its VQAv2/VizWiz submissions). The alternative protocol ``"vqa_api"`` follows
``vqaEval.py`` of the original VQA API (GT-Vision-Lang-Comp/VQA ``PythonEvaluationTools``). This module is an
independent implementation of those definitions; the lookup tables (contractions, number words, articles,
punctuation marks) are the official ones.

Semantics (protocol ``"m4c"``, the default)::

    norm(s)   = digit_article(punctuation(strip(tokenize(s))))     # applied to the prediction AND
                                                                   # to every human answer
    acc(p, A) = 1/n * sum_{i=1..n} min(1, #{j != i : norm(A_j) == norm(p)} / 3)

i.e. the mean over the ``n`` (= 10) leave-one-out subsets of the human answers of
``min(1, matches / 3)``. With ``k`` of 10 answers matching this is 0.3 (k=1), 0.6 (k=2), 0.9 (k=3) and
1.0 (k>=4).

Normalisation steps (:func:`normalize_answer`):

1. tokenize: lower-case; delete every ``,`` and ``?``; ``'s`` -> `` 's``; strip.
2. ``\\n`` and ``\\t`` -> space; strip.
3. punctuation (:func:`process_punctuation`): for each mark of :data:`PUNCTUATION`, if the *input* text has
   the mark next to a space anywhere, or contains a digit-comma-digit, the mark is deleted everywhere;
   otherwise it is replaced by a space everywhere. Then every ``.`` not followed by a digit is deleted.
4. digits/articles (:func:`process_digit_article`): lower-case, split on whitespace, map number words
   ``none``/``zero``..``ten`` to digits (:data:`NUMBER_MAP`, the "manual map"), drop the articles
   ``a``/``an``/``the``, replace contractions written without apostrophe (:data:`CONTRACTIONS`, e.g.
   ``dont`` -> ``don't``), join with single spaces.

Quirks of the official code, reproduced on purpose:

* the period rule's regex ``(?!<=\\d)(\\.)(?!\\d)`` was meant as a look-behind but is a look-ahead for the
  literal ``<=``: a period is deleted whenever it is not followed by a digit, also after a digit
  (``"3."`` -> ``"3"``); ``"2.5"`` and ``".5"`` keep theirs;
* ``re.UNICODE`` is passed as the positional *count* of ``re.sub``: at most 32 periods are deleted;
* the delete-or-space decision per mark looks at the original text, not the text being edited, and a
  single digit-comma-digit anywhere makes *every* mark be deleted (``"1,000-2"`` -> ``"10002"`` under
  ``"vqa_api"``); under ``"m4c"`` the tokenizer has already deleted all commas, so that rule never fires;
* ``'``, ``:``, ``%``, ``$``, ``#``, ``&``, ``*`` are not punctuation here (``"10%"`` stays ``"10%"``);
* articles are dropped anywhere in the answer, not only at its start; only ``zero``..``ten`` and ``none``
  (-> ``"0"``) are number words;
* the contraction keys ``Im``, ``Ive``, ``Id've``, ``I'dve`` have capitals and can never match the
  lower-cased words; ``somebody'd`` maps to ``somebodyd`` (a reversed entry).

Protocol ``"vqa_api"`` (original VQA API): the prediction gets steps 2-4 (no tokenize step); the human
answers get step 2 and, only when they are not all identical, step 3 alone (no number/article/contraction
processing, and no re-splitting: a human ``"yes!"`` becomes ``"yes "`` with its space and never matches);
matching is exact string equality.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_MAP",
    "PROTOCOLS",
    "PUNCTUATION",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "vqa_accuracy_batch",
]

PROTOCOLS = ("m4c", "vqa_api")

# The official contraction table (VQA API ``contractions`` == m4c ``CONTRACTIONS``), including its quirks.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

# The "manual map": number words to digits ("none" -> "0" included).
NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official punctuation marks, in the official order (the order does not change the result).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# A period not followed by a digit (the official pattern, typo included: "(?!<=\d)" is a look-ahead).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official code passes re.UNICODE (32) as re.sub's count
_COMMA_BETWEEN_DIGITS = {
    "m4c": re.compile(r"(?<=\d)(\,)+(?=\d)"),
    "vqa_api": re.compile(r"(\d)(\,)(\d)"),
}


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")


def _tokenize(text: str) -> str:
    """m4c ``word_tokenize``: lower-case, delete ``,`` and ``?``, split off ``'s``, strip."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _flatten_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str, protocol: str = "m4c") -> str:
    """The official punctuation rule (step 3 of :func:`normalize_answer`), quirks included.

    ``protocol`` only selects the digit-comma-digit pattern: m4c's ``(?<=\\d),+(?=\\d)`` or the VQA API's
    ``(\\d),(\\d)`` (they differ only on runs of commas such as ``"1,,2"``).
    """
    _check_protocol(protocol)
    comma_between_digits = _COMMA_BETWEEN_DIGITS[protocol].search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or comma_between_digits:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Number words to digits, articles dropped, contractions restored (step 4 of ``normalize_answer``)."""
    words = [NUMBER_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(s: str) -> str:
    """The EvalAI / m4c answer normalisation (``EvalAIAnswerProcessor.__call__``); see the module docstring.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("The man's hat, dont know?")
    "man 's hat don't know"
    """
    text = _flatten_whitespace(_tokenize(s))
    return process_digit_article(process_punctuation(text, "m4c"))


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """mean_i min(1, #{j != i : answers[j] == prediction} / 3) over the n leave-one-out subsets."""
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    # Holding out answer i leaves (total - matches[i]) matching answers among the other n - 1.
    return sum(min(1.0, (total - held_out) / 3.0) for held_out in matches) / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], protocol: str = "m4c") -> float:
    """VQA soft accuracy of one prediction against the human answers (10 for VQAv2/TextVQA/VizWiz).

    ``protocol="m4c"`` (default): prediction and every answer are normalised by :func:`normalize_answer`.
    ``protocol="vqa_api"``: the original VQA API processing (see the module docstring).

    The official m4c code asserts exactly 10 answers; any ``n >= 2`` is accepted here (the leave-one-out
    mean is over ``n`` subsets). One answer leaves an empty subset (always 0), so it is refused: score a
    single reference with :func:`asymlora.evaluate.metrics.builtin.vqa_match` instead.
    """
    _check_protocol(protocol)
    if isinstance(answers, str):
        raise TypeError("answers must be a list of human answers, not one string")
    if len(answers) < 2:
        raise ValueError(
            f"VQA accuracy needs at least 2 human answers (leave-one-out), got {len(answers)}; "
            "for a single reference use asymlora.evaluate.metrics.builtin.vqa_match"
        )
    if protocol == "m4c":
        return _leave_one_out(normalize_answer(prediction), [normalize_answer(a) for a in answers])
    predicted = process_digit_article(process_punctuation(_flatten_whitespace(prediction), "vqa_api"))
    humans = [_flatten_whitespace(a) for a in answers]
    if len(set(humans)) > 1:
        humans = [process_punctuation(a, "vqa_api") for a in humans]
    return _leave_one_out(predicted, humans)


def vqa_accuracy_batch(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], protocol: str = "m4c"
) -> dict[str, Any]:
    """VQA accuracy over a set of questions.

    Returns ``{"accuracy": mean in [0, 1], "per_question": [score of each question], "count": n}``.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    scores = [vqa_accuracy(p, a, protocol) for p, a in zip(predictions, answers)]
    return {"accuracy": sum(scores) / len(scores), "per_question": scores, "count": len(scores)}
