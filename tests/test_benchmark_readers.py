"""Benchmark readers on tiny synthetic files in the official layouts, their errors, prompts and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asymlora.errors import DataError
from asymlora.evaluate.official.items import EvalItem, MissingFileError
from asymlora.evaluate.official.readers import (
    format_scienceqa_question,
    read_gqa,
    read_mme,
    read_pope,
    read_scienceqa,
    read_textvqa,
    read_vizwiz,
)
from asymlora.evaluate.official.registry import (
    METRICS,
    PROMPTS,
    READERS,
    build_prompt,
    read_benchmark,
    score_benchmark,
)

BENCHMARK_NAMES = {"textvqa", "gqa", "vizwiz", "scienceqa", "mme", "pope"}


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- TextVQA


def textvqa(tmp_path: Path, records: list[dict] | None = None) -> Path:
    if records is None:
        records = [
            {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand?",
             "answers": ["nokia"] * 8 + ["nokia phone"] * 2},
            {"question_id": 34603, "image_id": "003a8ae2ef43b902", "question": "what number?",
             "answers": ["2"] * 2 + ["3"] * 8, "ocr_tokens": ["2", "3"]},
        ]  # fmt: skip
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("image_id"), str):
            touch(tmp_path / "train_images" / f"{record['image_id']}.jpg")
    return write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": records})


def test_read_textvqa(tmp_path: Path) -> None:
    path = textvqa(tmp_path)
    items = read_textvqa(path)
    assert [item.id for item in items] == ["34602", "34603"]
    assert items[0].image == tmp_path / "train_images" / "003a8ae2ef43b901.jpg"
    assert items[0].question == "what is the brand?"
    assert len(items[0].answers) == 10
    assert items[1].extra == {"question_id": 34603, "image_id": "003a8ae2ef43b902", "ocr_tokens": ["2", "3"]}
    assert read_textvqa(tmp_path, limit=1) == items[:1]  # a folder works too
    assert read_textvqa(path, limit=0) == []


def test_textvqa_errors(tmp_path: Path) -> None:
    bad = textvqa(tmp_path, [{"question_id": 1, "image_id": "a", "question": "q", "answers": ["x"] * 10},
                             {"question_id": 2, "image_id": "b", "answers": ["x"] * 10}])  # fmt: skip
    with pytest.raises(
        DataError, match=r"TextVQA_0\.5\.1_val\.json: record 1 of data \(question_id 2\): .*'question'"
    ):
        read_textvqa(bad)
    textvqa(tmp_path, [{"question_id": 1, "image_id": "a", "question": "q", "answers": "x"}])
    with pytest.raises(DataError, match=r"record 0 .*'answers' must be list"):
        read_textvqa(bad)
    textvqa(tmp_path, [{"question_id": 1, "image_id": "a", "question": "q", "answers": [1, 2]}])
    with pytest.raises(DataError, match="'answers' must be a list of strings"):
        read_textvqa(bad)
    write_json(bad, {"questions": []})
    with pytest.raises(DataError, match='"data" list'):
        read_textvqa(bad)
    bad.write_text('{"data": [\n{"question_id": 1,}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2, column \d+: not valid JSON"):
        read_textvqa(bad)
    with pytest.raises(MissingFileError, match="TextVQA_0.5.1_val.json"):
        read_textvqa(tmp_path / "elsewhere")


def test_textvqa_missing_images(tmp_path: Path) -> None:
    path = textvqa(tmp_path)
    (tmp_path / "train_images" / "003a8ae2ef43b902.jpg").unlink()
    with pytest.raises(
        MissingFileError, match=r"003a8ae2ef43b902\.jpg: image of record 1 .*question_id 34603"
    ):
        read_textvqa(path)
    assert isinstance(MissingFileError("x"), FileNotFoundError) and isinstance(
        MissingFileError("x"), DataError
    )
    assert len(read_textvqa(path, check_images=False)) == 2
    other = tmp_path / "other_images"
    other.mkdir()
    with pytest.raises(MissingFileError, match="other_images"):
        read_textvqa(path, image_root=other)
    with pytest.raises(MissingFileError, match="image_root"):
        read_textvqa(path, image_root=tmp_path / "nowhere")
    for image in (tmp_path / "train_images").iterdir():
        image.unlink()
    (tmp_path / "train_images").rmdir()
    with pytest.raises(MissingFileError, match="no image folder for TextVQA: tried .*pass image_root="):
        read_textvqa(path)


# -------------------------------------------------------------------------------------------------- GQA


def gqa(tmp_path: Path, questions: dict | None = None) -> Path:
    if questions is None:
        questions = {
            "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no",
                          "fullAnswer": "No, it is clear.", "isBalanced": True,
                          "types": {"structural": "verify", "semantic": "global", "detailed": "weather"},
                          "groups": {"global": None, "local": "02q-weather"}},
            "201640614": {"imageId": "n235859", "question": "Who is wearing the shirt?", "answer": "girl",
                          "types": {"structural": "query"}, "groups": {"global": "person", "local": "x"}},
        }  # fmt: skip
    for record in questions.values():
        if isinstance(record, dict) and isinstance(record.get("imageId"), str):
            touch(tmp_path / "images" / f"{record['imageId']}.jpg")
    return write_json(tmp_path / "testdev_balanced_questions.json", questions)


def test_read_gqa(tmp_path: Path) -> None:
    items = read_gqa(gqa(tmp_path))
    assert [item.id for item in items] == ["201307251", "201640614"]
    assert items[0].image == tmp_path / "images" / "n161313.jpg"
    assert items[0].answers == ["no"]
    assert items[0].extra == {"structural": "verify", "global_group": None, "is_balanced": True,
                              "full_answer": "No, it is clear."}  # fmt: skip
    assert items[1].extra["global_group"] == "person" and items[1].extra["full_answer"] is None


def test_gqa_errors(tmp_path: Path) -> None:
    path = gqa(tmp_path, {"1": {"imageId": "a", "question": "q"}})
    with pytest.raises(
        DataError, match=r"testdev_balanced_questions\.json: question '1': missing field 'answer'"
    ):
        read_gqa(path)
    gqa(tmp_path, {"1": {"imageId": "a", "question": "q", "answer": "x", "isBalanced": "yes"}})
    with pytest.raises(DataError, match="'isBalanced'"):
        read_gqa(path)
    gqa(tmp_path, {"1": {"imageId": "a", "question": "q", "answer": "x", "types": ["query"]}})
    with pytest.raises(DataError, match="'types' and 'groups' must be objects"):
        read_gqa(path)
    gqa(tmp_path, {"1": {"imageId": 7, "question": "q", "answer": "x"}})
    with pytest.raises(DataError, match="field 'imageId' must be str, got int"):
        read_gqa(path)
    write_json(path, [1, 2])
    with pytest.raises(DataError, match="mapping question ids"):
        read_gqa(path)


# ----------------------------------------------------------------------------------------------- VizWiz


def vizwiz(tmp_path: Path, records: list | None = None) -> Path:
    if records is None:
        answers = [{"answer": "unanswerable", "answer_confidence": "yes"}] * 6
        answers += [{"answer": "basil", "answer_confidence": "maybe"}] * 4
        records = [
            {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answers": answers,
             "answerable": 0, "answer_type": "unanswerable"},
            {"image": "VizWiz_val_00000001.jpg", "question": "What color?"},
        ]  # fmt: skip
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("image"), str):
            touch(tmp_path / "val" / record["image"])
    return write_json(tmp_path / "val.json", records)


def test_read_vizwiz(tmp_path: Path) -> None:
    items = read_vizwiz(vizwiz(tmp_path))
    assert items[0].id == "VizWiz_val_00000000.jpg"
    assert items[0].image == tmp_path / "val" / "VizWiz_val_00000000.jpg"
    assert items[0].answers == ["unanswerable"] * 6 + ["basil"] * 4
    assert items[0].extra["answerable"] == 0 and items[0].extra["answer_type"] == "unanswerable"
    assert items[0].extra["answer_confidence"][-1] == "maybe"
    assert items[1].answers == []  # a test-split record has no answers


def test_vizwiz_errors(tmp_path: Path) -> None:
    path = vizwiz(
        tmp_path, [{"image": "a.jpg", "question": "q", "answers": [{"answer": "x"}, {"confidence": 1}]}]
    )
    with pytest.raises(
        DataError, match=r"val\.json: record 0 \(image a\.jpg\), answers\[1\]: missing field 'answer'"
    ):
        read_vizwiz(path)
    vizwiz(tmp_path, [{"image": "a.jpg", "question": "q", "answers": "x"}])
    with pytest.raises(DataError, match="'answers' must be a list"):
        read_vizwiz(path)
    vizwiz(tmp_path, [{"question": "q"}])
    with pytest.raises(DataError, match="record 0: missing field 'image'"):
        read_vizwiz(path)
    write_json(path, {"image": "a.jpg"})
    with pytest.raises(DataError, match="list of questions"):
        read_vizwiz(path)


# -------------------------------------------------------------------------------------------- ScienceQA


def scienceqa(tmp_path: Path, problems: dict | None = None) -> Path:
    if problems is None:
        problems = {
            "5": {"question": "Which is a mammal?", "choices": ["frog", "cat", "trout"], "answer": 1,
                  "hint": "Look at the animals.", "image": "image.png", "split": "test",
                  "subject": "natural science", "grade": "grade3"},
            "6": {"question": "Which is a noun?", "choices": ["run", "table"], "answer": 1, "hint": "",
                  "image": None, "split": "test"},
            "7": {"question": "Which is north?", "choices": ["A", "B"], "answer": 0, "hint": "",
                  "image": "image.png", "split": "train"},
            "8": {"question": "Which is hot?", "choices": ["sun", "ice"], "answer": 0, "image": "image.png",
                  "split": "test"},
        }  # fmt: skip
    for pid, record in problems.items():
        if isinstance(record, dict) and record.get("image"):
            touch(tmp_path / "images" / str(record.get("split")) / pid / record["image"])
    return write_json(tmp_path / "problems.json", problems)


def test_read_scienceqa_img_subset(tmp_path: Path) -> None:
    items = read_scienceqa(scienceqa(tmp_path))
    assert [item.id for item in items] == ["5", "8"]  # test split, with an image
    assert items[0].image == tmp_path / "images" / "test" / "5" / "image.png"
    assert items[0].question == "Context: Look at the animals.\nWhich is a mammal?\nA. frog\nB. cat\nC. trout"
    assert items[1].question == "Which is hot?\nA. sun\nB. ice"  # no hint: no Context line
    assert items[0].answers == ["B"]
    assert items[0].extra["answer_index"] == 1 and items[0].extra["num_choices"] == 3
    assert items[0].extra["subject"] == "natural science"
    assert [item.id for item in read_scienceqa(tmp_path, split="train")] == ["7"]
    assert format_scienceqa_question("Q?", ["x", "y"], "h") == "Context: h\nQ?\nA. x\nB. y"


def test_scienceqa_errors(tmp_path: Path) -> None:
    base = {"question": "q", "choices": ["a", "b"], "image": "image.png", "split": "test"}
    path = scienceqa(tmp_path, {"9": {**base, "answer": 2}})
    with pytest.raises(
        DataError, match=r"problems\.json: problem '9': field 'answer' is 2, not a choice index 0\.\.1"
    ):
        read_scienceqa(path)
    scienceqa(tmp_path, {"9": {**base, "answer": True}})
    with pytest.raises(DataError, match="field 'answer' must be int, got bool"):
        read_scienceqa(path)
    scienceqa(tmp_path, {"9": {**base, "choices": list("abcdef"), "answer": 0}})
    with pytest.raises(DataError, match="6 options, at most 5"):
        read_scienceqa(path)
    scienceqa(tmp_path, {"9": {"question": "q", "choices": ["a"], "answer": 0, "image": "image.png"}})
    with pytest.raises(DataError, match="problem '9': missing field 'split'"):
        read_scienceqa(path)
    scienceqa(tmp_path, {"9": {**base, "answer": 0}})
    (tmp_path / "images" / "test" / "9" / "image.png").unlink()
    with pytest.raises(MissingFileError, match=r"9/image\.png: image of problem '9'"):
        read_scienceqa(path)


# ------------------------------------------------------------------------------------------------- MME


def mme(tmp_path: Path) -> Path:
    root = tmp_path / "MME_Benchmark_release_version"
    # layout 1: images/ + questions_answers_YN/
    touch(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Leonardo? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n",
        encoding="utf-8",
    )
    # layout 2: image next to a same-named .txt (a .png here)
    touch(root / "existence" / "000000006040.png")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\r\n\r\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\r\n",
        encoding="utf-8",
    )
    (root / "not_a_subtask").mkdir()
    return root


def test_read_mme_both_layouts(tmp_path: Path) -> None:
    root = mme(tmp_path)
    items = read_mme(root)
    # official subtask order: existence (perception, first) before artwork
    assert [item.id for item in items] == [
        "existence/000000006040.png/0", "existence/000000006040.png/1",
        "artwork/10002.jpg/0", "artwork/10002.jpg/1",
    ]  # fmt: skip
    assert items[0].image == root / "existence" / "000000006040.png"
    assert items[2].image == root / "artwork" / "images" / "10002.jpg"
    assert items[0].question == "Is there a train in this image? Please answer yes or no."
    assert [item.answers for item in items] == [["Yes"], ["No"], ["Yes"], ["No"]]
    assert items[2].extra == {
        "subtask": "artwork",
        "image_key": "artwork/10002.jpg",
        "category": "perception",
    }
    assert [item.id for item in read_mme(root, subtasks=["artwork"])] == [
        "artwork/10002.jpg/0",
        "artwork/10002.jpg/1",
    ]
    assert len(read_mme(root, limit=3)) == 3


def test_mme_errors(tmp_path: Path) -> None:
    root = mme(tmp_path)
    txt = root / "existence" / "000000006040.txt"
    txt.write_text("Is there a train?\tYes\nIs there a bed? No\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"000000006040\.txt: line 2: expected 'question<TAB>answer', got 1 fields"
    ):
        read_mme(root)
    txt.write_text("Is there a train?\tMaybe\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: field answer must be Yes or No, got 'Maybe'"):
        read_mme(root)
    txt.write_text("Is there a train?\tYes\n", encoding="utf-8")
    (root / "existence" / "000000006040.png").unlink()
    with pytest.raises(MissingFileError, match=r"000000006040\.\*: image of .*000000006040\.txt not found"):
        read_mme(root)
    with pytest.raises(MissingFileError, match="color"):
        read_mme(root, subtasks=["color"])
    with pytest.raises(ValueError, match="unknown MME subtask"):
        read_mme(root, subtasks=["colour"])
    with pytest.raises(ValueError, match="image_root"):
        read_mme(root, image_root=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="no MME subtask folder"):
        read_mme(empty)


# ------------------------------------------------------------------------------------------------ POPE


def pope(tmp_path: Path) -> Path:
    folder = tmp_path / "pope" / "coco"
    folder.mkdir(parents=True)
    lines = {
        "random": [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                    "text": "Is there a snowboard in the image?", "label": "yes"},
                   {"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
                    "text": "Is there a dog in the image?", "label": "no"}],
        "adversarial": [{"question_id": 1, "image": "COCO_val2014_000000210789.jpg",
                         "text": "Is there a car in the image?", "label": "no"}],
    }  # fmt: skip
    for category, records in lines.items():
        text = "\n".join(json.dumps(r) for r in records) + "\n\n"
        (folder / f"coco_pope_{category}.json").write_text(text, encoding="utf-8")
        for record in records:
            touch(tmp_path / "pope" / "val2014" / record["image"])
    return folder


def test_read_pope(tmp_path: Path) -> None:
    folder = pope(tmp_path)
    items = read_pope(folder)
    assert [item.id for item in items] == ["adversarial/1", "random/1", "random/2"]  # sorted files
    assert items[1].image == tmp_path / "pope" / "val2014" / "COCO_val2014_000000310196.jpg"
    assert items[1].answers == ["yes"]
    assert items[1].extra == {"question_id": 1, "category": "random"}
    single = read_pope(folder / "coco_pope_random.json")
    assert [item.id for item in single] == ["1", "2"]
    assert len(read_pope(folder, limit=2)) == 2


def test_pope_errors(tmp_path: Path) -> None:
    folder = pope(tmp_path)
    file = folder / "coco_pope_random.json"
    good = {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "q", "label": "yes"}
    file.write_text(json.dumps(good) + '\n{"question_id": 2, "image": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"coco_pope_random\.json: line 2: invalid JSON"):
        read_pope(file)
    file.write_text(
        '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "q", "label": "Y"}\n'
    )
    with pytest.raises(DataError, match=r"line 1: field 'label' must be 'yes' or 'no', got 'Y'"):
        read_pope(file)
    file.write_text('{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "label": "yes"}\n')
    with pytest.raises(DataError, match="line 1: missing field 'text'"):
        read_pope(file)
    file.write_text('{"question_id": 1, "image": "missing.jpg", "text": "q", "label": "yes"}\n')
    with pytest.raises(MissingFileError, match=r"missing\.jpg: image of line 1"):
        read_pope(file)
    with pytest.raises(MissingFileError, match="POPE file or folder"):
        read_pope(tmp_path / "nothing")


# ----------------------------------------------------------------------------- registry, prompts, scoring


def test_registry_and_prompts(tmp_path: Path) -> None:
    assert set(READERS) == set(PROMPTS) == set(METRICS) == BENCHMARK_NAMES
    single = "Answer the question using a single word or phrase."
    for name in ("textvqa", "gqa", "mme", "pope"):
        assert PROMPTS[name] == single
    assert PROMPTS["vizwiz"] == (
        "When the provided information is insufficient, respond with 'Unanswerable'.\n" + single
    )
    assert PROMPTS["scienceqa"] == "Answer with the option's letter from the given choices directly."
    item = EvalItem("1", None, "What is this?", ["x"])
    assert build_prompt("gqa", item) == "What is this?\n" + single
    already = EvalItem("1", None, "What is this?\n" + single, ["x"])
    assert build_prompt("gqa", already) == already.question  # never appended twice
    items = read_benchmark("gqa", gqa(tmp_path), limit=1)
    assert [i.id for i in items] == ["201307251"]
    assert len(read_benchmark("scienceqa", scienceqa(tmp_path), split="train")) == 1
    with pytest.raises(ValueError, match="unknown benchmark"):
        read_benchmark("vqav3", tmp_path)
    with pytest.raises(ValueError, match="limit"):
        read_benchmark("gqa", tmp_path, limit=-1)


def test_score_benchmark(tmp_path: Path) -> None:
    text_items = read_textvqa(textvqa(tmp_path / "t"))
    # nokia: 8 of 10 answers -> 1.0; "2": 2 of 10 -> 0.6
    result = score_benchmark("textvqa", text_items, ["Nokia.", "two"])
    assert result["benchmark"] == "textvqa"
    assert result["per_question"] == pytest.approx([1.0, 0.6])
    assert result["accuracy"] == pytest.approx(0.8)
    by_id = score_benchmark("textvqa", text_items, {"34602": "nokia", "34603": "3"})
    assert by_id["per_question"] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="no prediction"):
        score_benchmark("textvqa", text_items, {"34602": "nokia"})
    with pytest.raises(ValueError, match="one prediction per item"):
        score_benchmark("textvqa", text_items, ["nokia"])

    viz_items = read_vizwiz(vizwiz(tmp_path / "v"))
    with pytest.raises(ValueError, match="evaluation server"):
        score_benchmark("vizwiz", viz_items, ["Unanswerable", "red"])
    assert score_benchmark("vizwiz", viz_items[:1], ["Unanswerable"])["accuracy"] == 1.0

    gqa_result = score_benchmark("gqa", read_gqa(gqa(tmp_path / "g")), ["No.", "boy"])
    assert gqa_result["accuracy"] == 0.5 and gqa_result["binary"] == 1.0 and gqa_result["open"] == 0.0
    assert gqa_result["distribution"] == pytest.approx(
        0.01
    )  # group "person": G={girl:1}, P={boy:1}: (0-1)^2/1/100

    sqa_result = score_benchmark("scienceqa", read_scienceqa(scienceqa(tmp_path / "s")), ["B", "(A)"])
    assert sqa_result["accuracy"] == 0.5 and sqa_result["img_accuracy"] == 0.5 and sqa_result["failed"] == 1

    mme_result = score_benchmark("mme", read_mme(mme(tmp_path / "m")), ["Yes", "No", "Yes", "Yes"])
    assert mme_result["subtasks"]["existence"]["score"] == 200.0
    assert mme_result["subtasks"]["artwork"]["score"] == 50.0
    assert mme_result["perception"] == 250.0 and mme_result["cognition"] == 0

    pope_result = score_benchmark("pope", read_pope(pope(tmp_path / "p")), ["No", "Yes", "There is no dog."])
    assert pope_result["categories"]["adversarial"]["accuracy"] == 1.0
    assert pope_result["categories"]["random"]["accuracy"] == 1.0
    assert pope_result["overall"]["f1"] == 1.0 and "per_question" not in pope_result["overall"]
    assert pope_result["mean"]["yes_ratio"] == pytest.approx(0.25)  # (0 + 1/2) / 2
