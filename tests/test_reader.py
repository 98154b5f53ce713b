"""The user-data reader: both formats, and a file:line error for each kind of bad input."""

import json

import pytest
from PIL import Image

from asymlora import DataError
from asymlora.data import read_samples, read_samples_with_report


@pytest.fixture
def images(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name)
    return tmp_path


def llava(i=0, image="a.png", question="<image>\nwhat?", answer="x", **extra):
    record = {"id": f"s{i}", "image": image, "conversations": [{"from": "human", "value": question},
                                                              {"from": "gpt", "value": answer}]}
    record.update(extra)
    return record


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=2))
    return path


def test_llava_json_and_messages_formats_give_the_same_sample(images):
    a = read_samples(write_json(images / "a.json", [llava(task="vqa")]))[0]
    chat = {"id": "s0", "task": "vqa", "images": ["a.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nwhat?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}
    (images / "b.jsonl").write_text(json.dumps(chat) + "\n")
    b = read_samples(images / "b.jsonl")[0]
    assert (a.id, a.messages, a.images, a.task) == (b.id, b.messages, b.images, b.task)
    assert a.images == [(images / "a.png").resolve()] and a.source.endswith("a.json:2")


def test_multiple_images_and_text_only(images):
    rows = [llava(image=["a.png", "b.png"], question="<image> vs <image>?"),
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    samples = read_samples(write_json(images / "m.json", rows))
    assert len(samples[0].images) == 2 and samples[1].images == [] and samples[1].id == "m-1"
    with pytest.raises(DataError, match="at most 1 per sample"):
        read_samples(images / "m.json", max_images_per_sample=1)


@pytest.mark.parametrize(("record", "field"), [
    ("not an object", "record: expected a JSON object"),
    ({"id": 1}, "conversations: missing"),
    ({"conversations": "hello"}, "conversations: expected a non-empty list"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from: 'bot' is not one of"),
    ({"conversations": [{"from": "human", "value": 3}]}, "conversations[0].value: expected a string"),
    ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "expected 'user'"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant reply"),
    (llava(image="missing.png"), "image: file not found"),
    (llava(question="no placeholder"), "0 <image> placeholder(s) for 1 image(s); set auto_insert_image_token"),
    (llava(question="<image><image>"), "2 <image> placeholder(s) for 1 image(s)"),
    (llava(task=5), "task: expected a string"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]"),
])
def test_each_bad_input_names_file_line_and_field(images, record, field):
    path = write_json(images / "bad.json", [llava(), record])
    with pytest.raises(DataError) as info:
        read_samples(path)
    message = str(info.value)
    assert f"{path}:16: " in message, message  # the second record starts on line 16 of the indented file
    assert field in message


def test_malformed_json_reports_line(images):
    (images / "broken.jsonl").write_text(json.dumps(llava()) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        read_samples(images / "broken.jsonl")
    (images / "broken.json").write_text('[\n {"a": 1},\n {"b": \n')
    with pytest.raises(DataError, match=r"broken.json:\d+: not valid JSON"):
        read_samples(images / "broken.json")


def test_skip_mode_counts_and_groups(images):
    rows = [llava(0), llava(1, image="missing.png"), llava(2, question="plain"), llava(3)]
    samples, report = read_samples_with_report(write_json(images / "s.json", rows), on_error="skip")
    assert [s.id for s in samples] == ["s0", "s3"] and report.skipped == 2
    assert "image: 1" in report.summary() and "conversations: 1" in report.summary()
    auto = read_samples(images / "s.json", on_error="skip", auto_insert_image_token=True)
    assert [s.id for s in auto] == ["s0", "s2", "s3"] and auto[1].messages[0]["content"].startswith("<image>\n")


def test_fail_mode_lists_all_problems(images):
    rows = [llava(i, image="missing.png") for i in range(25)]
    with pytest.raises(DataError, match=r"(?s)25 malformed sample.*\nand 5 more$"):
        read_samples(write_json(images / "many.json", rows))
