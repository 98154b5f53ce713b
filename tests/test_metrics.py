"""Metrics: every normalisation rule and parser branch, with expected values computed by hand from the
official definitions (see docs/metrics.md)."""

from __future__ import annotations

import pytest

from asymlora.evaluate.metrics import builtin, gqa, mme, pope, scienceqa
from asymlora.evaluate.metrics.builtin import (
    TASK_METRICS,
    character_error_rate,
    exact_match,
    first_word_match,
    levenshtein,
    normalize_text,
    rouge_l,
    score_task,
    vqa_match,
)
from asymlora.evaluate.metrics.vqa import (
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_accuracy_batch,
)

# ----------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("YES", "yes"),  # lower-case
        ("1,000", "1000"),  # the tokenizer deletes every comma
        ("red, white", "red white"),
        ("yes?", "yes"),  # ... and every "?"
        ("man's hat", "man 's hat"),  # "'s" split off
        ("red\nwhite\tblue", "red white blue"),  # newline / tab -> space
        ("  red  ", "red"),
        ("yes-no", "yes no"),  # mark not next to a space: replaced by a space
        ("x- y-z", "x yz"),  # mark next to a space somewhere: deleted everywhere
        ("(2)", "2"),
        ("3.", "3"),  # a period not followed by a digit is deleted, also after a digit (regex typo)
        ("2.5", "2.5"),  # a period followed by a digit stays
        (".5", ".5"),
        ("u.s.a", "usa"),
        ("two", "2"),  # manual map (number words)
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten
        ("the cat", "cat"),  # articles dropped, anywhere
        ("a dog", "dog"),
        ("an apple in the box", "apple in box"),
        ("dont", "don't"),  # contractions
        ("isnt", "isn't"),
        ("Im", "im"),  # capitalised contraction keys never match the lower-cased words
        ("somebody'd", "somebodyd"),  # the reversed entry
        ("10%", "10%"),  # % is not punctuation here
        ("it's", "it 's"),
        ("Two dogs.", "2 dogs"),
        ("The man's hat, dont know?", "man 's hat don't know"),
    ],
)
def test_normalize_answer_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_process_punctuation_comma_between_digits_and_period_count() -> None:
    # A digit-comma-digit anywhere deletes every mark (instead of spacing it).
    assert process_punctuation("1,000-2", "vqa_api") == "10002"
    assert process_punctuation("red,blue", "vqa_api") == "red blue"
    # m4c's pattern accepts a run of commas, the VQA API's only one.
    assert process_punctuation("1,,2", "m4c") == "12"
    assert process_punctuation("1,,2", "vqa_api") == "1  2"
    # re.UNICODE (32) passed as re.sub's count: at most 32 periods deleted.
    assert process_punctuation("." * 40) == "." * 8
    assert process_digit_article("The Two dont") == "2 don't"
    with pytest.raises(ValueError, match="protocol"):
        process_punctuation("x", "evalai")


@pytest.mark.parametrize(
    ("matches", "expected"),
    # mean over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3):
    # k=1: (1*0 + 9*1/3)/10; k=2: (2*1/3 + 8*2/3)/10; k=3: (3*2/3 + 7*1)/10; k=4: (4*1 + 6*1)/10
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    answers = ["blue"] * matches + ["red"] * (10 - matches)
    assert vqa_accuracy("blue", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_prediction_and_answers() -> None:
    answers = ["2", "two", "Two."] + ["3"] * 7
    assert vqa_accuracy("The two.", answers) == pytest.approx(0.9)  # all three normalise to "2"
    # n = 9 answers, 2 matching: (2 * 1/3 + 7 * 2/3) / 9 = 16/27
    assert vqa_accuracy("x", ["x", "x"] + ["y"] * 7) == pytest.approx(16 / 27)


def test_vqa_api_protocol_quirks() -> None:
    # Human answers get no number/article processing under the VQA API: "two" != processed prediction "2".
    answers = ["two"] * 4 + ["x"] * 6
    assert vqa_accuracy("two", answers, protocol="m4c") == 1.0
    assert vqa_accuracy("two", answers, protocol="vqa_api") == 0.0
    # Identical human answers are not processed at all; the prediction always is.
    assert vqa_accuracy("yes!", ["yes!"] * 10, protocol="vqa_api") == 0.0
    assert vqa_accuracy("yes!", ["yes!"] * 10, protocol="m4c") == 1.0
    # Differing answers get the punctuation step alone: "red-blue" -> "red blue" ...
    assert vqa_accuracy("red blue", ["red-blue"] * 3 + ["no"] * 7, protocol="vqa_api") == pytest.approx(0.9)
    # ... which is not re-split: "yes!" -> "yes " keeps its space and never matches the prediction "yes".
    assert vqa_accuracy("yes", ["yes!"] * 3 + ["no"] * 7, protocol="vqa_api") == 0.0
    assert vqa_accuracy("yes", ["yes!"] * 3 + ["no"] * 7, protocol="m4c") == pytest.approx(0.9)


def test_vqa_accuracy_errors_and_batch() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        vqa_accuracy("x", ["x"])
    with pytest.raises(TypeError):
        vqa_accuracy("x", "xx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="protocol"):
        vqa_accuracy("x", ["x", "x"], protocol="other")
    result = vqa_accuracy_batch(["blue", "red"], [["blue"] * 2 + ["red"] * 8, ["blue"] * 10])
    assert result["per_question"] == pytest.approx([0.6, 0.0])
    assert result["accuracy"] == pytest.approx(0.3)
    assert result["count"] == 2
    with pytest.raises(ValueError):
        vqa_accuracy_batch(["a"], [])
    with pytest.raises(ValueError):
        vqa_accuracy_batch([], [])


# ----------------------------------------------------------------------------------------------- GQA


def test_gqa_normalisation_and_exact_match() -> None:
    assert gqa.normalize_gqa_answer(" Yes. ") == "yes"
    assert gqa.normalize_gqa_answer("Table..") == "table"
    assert gqa.gqa_exact_match("Yes.", "yes") == 1.0
    assert gqa.gqa_exact_match("yes", "Yes") == 0.0  # gold answers are used as they are
    assert gqa.gqa_exact_match("the table", "table") == 0.0  # no article removal in GQA


def test_gqa_distribution_hand_computed() -> None:
    gold = ["red", "red", "blue", "yes", "no", "left"]
    predicted = ["red", "blue", "blue", "yes", "purple", "right"]
    groups = ["g1", "g1", "g1", "g2", "g2", None]
    # g1: G={red:2, blue:1}, P={red:1, blue:2}: chi = (1-2)^2/2 + (2-1)^2/1 = 1.5, n = 3
    # g2: G={yes:1, no:1}, P={yes:1, purple:1}: chi = 0 + (0-1)^2/1 = 1, n = 2 ("purple" not counted)
    # None group skipped; (1.5*3 + 1*2) / 5 / 100 = 0.013
    assert gqa.gqa_distribution(gold, predicted, groups) == pytest.approx(0.013)
    # Quirk: a predicted answer outside the group's gold answers costs nothing by itself.
    assert gqa.gqa_distribution(["red", "red"], ["red", "purple"], ["g", "g"]) == pytest.approx(0.005)
    assert gqa.gqa_distribution(["red", "red"], ["red", "blue"], ["g", "g"]) == pytest.approx(0.005)
    assert gqa.gqa_distribution(["red"], ["red"], ["g"]) == 0.0
    with pytest.raises(ValueError, match="global group"):
        gqa.gqa_distribution(["red"], ["red"], [None])
    with pytest.raises(ValueError, match="lengths"):
        gqa.gqa_distribution(["red"], [], [None])


def test_gqa_scores() -> None:
    result = gqa.gqa_scores(
        ["Yes.", "red", "left", "no"],
        ["yes", "blue", "left", "no"],
        structural_types=["verify", "query", "query", None],
        global_groups=["g1", "g2", "g2", None],
        balanced=[True, True, True, False],
    )
    assert result["per_question"] == [1.0, 0.0, 1.0, 1.0]
    assert result["accuracy"] == pytest.approx(2 / 3)  # the unbalanced question is left out
    assert result["open"] == pytest.approx(0.5)
    assert result["binary"] == 1.0
    # g1: G={yes:1}, P={yes:1} -> 0; g2: G={blue:1, left:1}, P={red:1, left:1} -> 1; (0*1 + 1*2)/3/100
    assert result["distribution"] == pytest.approx(2 / 3 / 100)
    assert result["count"] == 3
    plain = gqa.gqa_scores(["a"], ["a"])
    assert plain["accuracy"] == 1.0 and plain["binary"] is None and plain["distribution"] is None
    with pytest.raises(ValueError, match="balanced"):
        gqa.gqa_scores(["a"], ["a"], balanced=[False])
    with pytest.raises(ValueError, match="answers"):
        gqa.gqa_scores(["a"], [])


# ----------------------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize(
    ("text", "official", "lenient"),
    [
        ("B", "B", "B"),  # branch 1: the exact letter
        ("B. Paris", "B", "B"),  # branch 2: letter + ". "
        ("The answer is C.", "C", "C"),  # branch 3: one "The answer is X." match
        ("Hmm. The answer is F.", "F", "F"),  # any capital; rejected later by option_index
        ("The answer is C", None, "C"),  # the official regex's "." needs one more character
        ("The answer is A. The answer is B.", None, None),  # two matches: failed
        ("B.", None, "B"),  # branch 2 needs ". " with the space
        (" B", None, "B"),
        ("(B)", None, "B"),
        ("(B) Paris", None, "B"),
        ("B) Paris", None, "B"),
        ("C: blue", None, "C"),
        ("Answer: (C)", None, "C"),
        ("the correct answer is D", None, "D"),
        ("The answer is (A) or the answer is (B)", None, None),  # lenient: disagreeing letters
        ("A cat", None, None),
        ("Because it is red", None, None),
        ("", None, None),
    ],
)
def test_parse_option_branches(text: str, official: str | None, lenient: str | None) -> None:
    assert scienceqa.parse_option(text) == official
    assert scienceqa.parse_option(text, lenient=True) == lenient


def test_option_index_and_correct() -> None:
    assert scienceqa.option_index("C", 3) == 2
    assert scienceqa.option_index("E", 4) == -1  # beyond the choices
    assert scienceqa.option_index("F", 5) == -1
    assert scienceqa.option_index(None, 5) == -1
    assert scienceqa.scienceqa_correct("B", 1, 3) == 1.0
    assert scienceqa.scienceqa_correct("(B)", 1, 3) == 0.0  # failure counts wrong
    assert scienceqa.scienceqa_correct("(B)", 1, 3, lenient=True) == 1.0


def test_scienceqa_scores() -> None:
    result = scienceqa.scienceqa_scores(
        ["A", "(B)", "The answer is C.", "D"],
        [0, 1, 2, 0],
        [2, 2, 3, 3],
        has_image=[True, True, False, False],
    )
    assert result["per_question"] == [1.0, 0.0, 1.0, 0.0]
    assert result["accuracy"] == 0.5
    assert result["img_accuracy"] == 0.5
    assert result["failed"] == 2  # "(B)" unparsed, "D" beyond 3 choices
    assert scienceqa.scienceqa_scores(["(B)"], [1], [2], lenient=True)["accuracy"] == 1.0
    assert scienceqa.scienceqa_scores(["A"], [0], [2])["img_accuracy"] is None
    with pytest.raises(ValueError):
        scienceqa.scienceqa_scores(["A"], [0, 1], [2])


# ----------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("No, there is none.", "no"),
        ("Yes\n", "yes"),
        ("not sure", "no"),  # "no" within the first four characters
        ("none", "no"),
        ("No, yes", "no"),
        ("I think yes", "other"),  # nothing in the first four characters
        ("  yes", "other"),  # not stripped
        ("", "other"),
    ],
)
def test_mme_parse_yes_no(text: str, label: str) -> None:
    assert mme.parse_yes_no(text) == label


def test_mme_subtask_score_acc_and_acc_plus() -> None:
    result = mme.mme_subtask_score(
        ["Yes", "No", "yes", "maybe"], ["Yes", "No", "Yes", "No"], ["img1", "img1", "img2", "img2"]
    )
    # acc = 3/4, acc+ = 1/2 (img2 has an "other" answer), score = 75 + 50
    assert result["acc"] == 0.75
    assert result["acc_plus"] == 0.5
    assert result["score"] == pytest.approx(125.0)
    assert result["other"] == 1
    assert result["images"] == 2
    with pytest.raises(ValueError, match="yes or no"):
        mme.mme_subtask_score(["yes"], ["maybe"], ["i"])


def test_mme_totals() -> None:
    assert len(mme.PERCEPTION_SUBTASKS) == 10 and len(mme.COGNITION_SUBTASKS) == 4
    subtasks = ["existence", "existence", "OCR", "OCR", "code_reasoning", "code_reasoning"]
    result = mme.mme_scores(
        ["yes", "no", "yes", "yes", "no", "no"],
        ["Yes", "No", "Yes", "No", "No", "No"],
        subtasks,
        ["a", "a", "b", "b", "c", "c"],
    )
    assert result["subtasks"]["existence"]["score"] == 200.0
    assert result["subtasks"]["OCR"]["score"] == 50.0  # acc 1/2, acc+ 0
    assert result["perception"] == 250.0
    assert result["cognition"] == 200.0
    assert result["total"] == 450.0
    assert "count" in result["missing_subtasks"] and "existence" not in result["missing_subtasks"]
    assert result["per_question"] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    # The maximum: every subtask perfect.
    all_subtasks = [s for s in mme.SUBTASKS for _ in range(2)]
    perfect = mme.mme_scores(["yes"] * 28, ["Yes"] * 28, all_subtasks, [s for s in all_subtasks])
    assert perfect["perception"] == 2000.0 and perfect["cognition"] == 800.0
    with pytest.raises(ValueError, match="unknown MME subtask"):
        mme.mme_scores(["yes"], ["Yes"], ["counting"], ["a"])


# ---------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("It is not there", "no"),
        ("Yes, no", "no"),  # commas are deleted: "Yes no"
        ("Yes. No.", "yes"),  # only the first sentence is kept
        ("NO", "yes"),  # everything else is a yes
        ("Nope", "yes"),
        ("No!", "yes"),
        ("no\n", "yes"),  # split on single spaces only
        ("", "yes"),
    ],
)
def test_pope_parse_yes_no(text: str, label: str) -> None:
    assert pope.parse_yes_no(text) == label


def test_pope_scores_hand_computed() -> None:
    result = pope.pope_scores(["yes", "no", "yes", "no", "Yes"], ["yes", "yes", "no", "no", "yes"])
    # TP = 2, FN = 1, FP = 1, TN = 1
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (2, 1, 1, 1)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["yes_ratio"] == pytest.approx(0.6)
    assert result["per_question"] == [1.0, 0.0, 0.0, 1.0, 1.0]
    never_yes = pope.pope_scores(["no", "no"], ["yes", "no"])
    assert never_yes["precision"] == 0.0 and never_yes["f1"] == 0.0 and never_yes["accuracy"] == 0.5


def test_pope_scores_by_category() -> None:
    result = pope.pope_scores_by_category(
        ["yes", "no", "yes", "yes"],
        ["yes", "no", "no", "yes"],
        ["random", "random", "adversarial", "adversarial"],
    )
    assert result["categories"]["random"]["accuracy"] == 1.0
    assert result["categories"]["adversarial"]["accuracy"] == 0.5
    assert result["mean"]["accuracy"] == 0.75
    assert result["per_question"] == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        pope.pope_scores_by_category(["yes"], ["yes"], [])


# ------------------------------------------------------------------------------------------- built-in


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Ankle   Boot. ", "ankle boot"),
        ("\u201cBlue\u201d", "blue"),  # Unicode quotes are punctuation
        ("T-shirt", "t-shirt"),  # inner punctuation kept
        ("\uff42\uff4c\uff55\uff45", "blue"),  # NFKC folds full-width letters
        ("$5", "$5"),  # symbols are not punctuation
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_exact_and_first_word_match() -> None:
    assert exact_match("Ankle boot.", "ankle boot") == 1.0
    assert exact_match("ankle boots", "ankle boot") == 0.0
    assert first_word_match("Blue, it is blue.", "blue") == 1.0
    assert first_word_match("It is blue", "blue") == 0.0
    assert first_word_match("Ankle boot, size 9", "ankle boot") == 1.0
    assert first_word_match("ankle", "ankle boot") == 0.0
    assert first_word_match("", "...") == 1.0  # empty reference: exact match of the normalised texts
    assert vqa_match("Two.", "2") == 1.0
    assert vqa_match("a circle", "circle") == 1.0
    assert vqa_match("circles", "circle") == 0.0


def test_levenshtein_and_cer() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein(["a", "b"], ["b"]) == 1
    assert character_error_rate("sitting", "kitten") == pytest.approx(0.5)  # 3 edits / 6 characters
    assert character_error_rate("Apple", "apple") == pytest.approx(0.2)  # case-sensitive
    assert character_error_rate(" apple \n", "apple") == 0.0  # surrounding whitespace stripped
    assert character_error_rate("abcdefg", "ab") == pytest.approx(2.5)  # can exceed 1
    assert character_error_rate("", "") == 0.0
    assert character_error_rate("x", "") == 1.0


def test_rouge_l() -> None:
    # LCS(the cat sat on the mat / the cat is on the mat) = 5 of 6 and 6 tokens
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # P = 3/3, R = 3/7: F = 2 * (3/7) / (10/7) = 0.6
    assert rouge_l("A grinning face", "A grinning face, a face-smiling emoji") == pytest.approx(0.6)
    assert rouge_l("b a", "a b") == pytest.approx(0.5)  # order matters (subsequence)
    assert rouge_l("dog", "cat") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("x", "") == 0.0
    assert builtin.rouge_l_tokens("A pi\u00f1ata & 2 cats!") == ["a", "pi\u00f1ata", "2", "cats"]


def test_task_registry_covers_builtin_datasets() -> None:
    from asymlora.builtin_data import BUILDERS

    assert set(TASK_METRICS) == set(BUILDERS) == {"easyvqa", "fashion", "digits", "emoji", "ocr"}
    assert TASK_METRICS["ocr"] is character_error_rate
    assert TASK_METRICS["emoji"] is exact_match  # one category word (docs/datasets.md)


def test_score_task() -> None:
    result = score_task("ocr", ["apple", "Pear"], ["apple", "pear"])
    assert result["metric"] == "character_error_rate"
    assert result["character_error_rate"] == pytest.approx(0.125)  # (0 + 1/4) / 2
    assert result["exact_match"] == 1.0  # exact match is case-insensitive
    assert result["higher_is_better"] is False
    assert result["per_sample"] == pytest.approx([0.0, 0.25])
    easy = score_task("easyvqa", ["Blue.", "a circle", "no"], ["blue", "circle", "yes"])
    assert easy["metric"] == "vqa_match" and easy["vqa_match"] == pytest.approx(2 / 3)
    assert easy["exact_match"] == pytest.approx(1 / 3)  # "a circle" != "circle" without VQA normalisation
    assert score_task("digits", ["13."], ["13"])["exact_match"] == 1.0
    assert score_task("emoji", ["Animals."], ["animals"])["exact_match"] == 1.0
    assert score_task("emoji", ["b a"], ["a b"], metric="rouge_l")["rouge_l"] == pytest.approx(0.5)
    assert score_task("custom", ["x"], ["x"], metric="first_word_match")["first_word_match"] == 1.0
    with pytest.raises(ValueError, match="no metric registered"):
        score_task("custom", ["x"], ["x"])
    with pytest.raises(ValueError, match="unknown metric"):
        score_task("ocr", ["x"], ["x"], metric="bleu")
    with pytest.raises(ValueError, match="predictions"):
        score_task("ocr", ["x"], [])
