"""`asymlora align` on the tiny model with small builds of the real datasets."""

import json

import pytest

from asymlora.align import build_caption_data
from asymlora.assets import locate
from asymlora.cli import main


def test_align_writes_projector_and_record(tmp_path, isolated_cache):
    if any(locate(name) is None for name in ("easyvqa", "mnist", "fashion", "twemoji")):
        pytest.skip("dataset assets missing: asymlora setup --only easyvqa mnist fashion twemoji")
    assert main(["data", "build", "--max-per-split", "24"]) == 0
    rows = json.loads(build_caption_data(tmp_path / "captions", seed=0, per_dataset=6).read_text())
    captions = {row["id"].split("-")[1]: row["conversations"][1]["value"] for row in rows}
    # easy-VQA captions need an image with both a shape and a colour question; small builds may have none
    assert {"fashion", "digits", "emoji", "ocr"} <= set(captions)
    assert captions["fashion"].startswith("A photo of a ") and captions["digits"].startswith("The digit ")
    assert captions["emoji"].startswith("An emoji from the ") and captions["ocr"].startswith('The word "')
    assert main(["build-tiny", "--out", str(tmp_path / "tiny")]) == 0
    out = tmp_path / "projector.safetensors"
    assert main(["align", "--model", str(tmp_path / "tiny"), "--steps", "2", "--batch-size", "2",
                 "--per-dataset", "6", "--out", str(out), "--output-dir", str(tmp_path / "run")]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 2 and len(record["sha256"]) == 64
    from asymlora.default_model import load_projector
    from asymlora.tiny import tiny_llava

    load_projector(tiny_llava(), out)


def test_easyvqa_captions_say_what_the_questions_reveal():
    from asymlora.align import captions_for

    def record(image, question, answer):
        return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                  {"from": "gpt", "value": answer}]}

    records = [
        record("a.png", "What is the color of the circle?", "red"),          # colour + the named shape
        record("b.png", "What shape is in the image?", "triangle"),          # shape only
        record("c.png", "Is a blue shape present?", "yes"),                  # positive, yes: blue
        record("d.png", "Is there not a green shape?", "no"),                # negated, no: green
        record("d.png", "What is the green shape?", "rectangle"),
        record("e.png", "Does the image contain a circle?", "no"),           # two absent shapes ...
        record("e.png", "Is there not a rectangle?", "yes"),                 # ... leave the triangle
        record("f.png", "Is there a red shape?", "no"),                      # only an absence: no caption
    ]
    assert captions_for("easyvqa", records) == [("a.png", "A red circle."), ("b.png", "A triangle."),
                                                ("c.png", "A blue shape."), ("d.png", "A green rectangle."),
                                                ("e.png", "A triangle.")]
