"""The user-data reader: every format (LLaVA, messages, ms-swift, LLaMA-Factory) gives one Sample, and each kind
of bad input names file:line: field."""

import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from asymlora import ConfigError, DataError
from asymlora.data import RecordFormat, Sample, read_samples, read_samples_with_report


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name)
    return tmp_path


def llava(i=0, image="a.png", question="<image>\nwhat?", answer="x", **extra):
    record = {"id": f"s{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    record.update(extra)
    return record


def chat(image_parts=1, images=("a.png",), **extra):
    content = [{"type": "image"}] * image_parts + [{"type": "text", "text": "\nwhat?"}]
    record = {"id": "s0", "messages": [{"role": "user", "content": content},
                                       {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}
    if images is not None:
        record["images"] = list(images)
    record.update(extra)
    return record


def write_list(path, rows):
    """A JSON list with each record spread over several lines; returns the line where each record starts."""
    chunks = [json.dumps(row, indent=1) for row in rows]
    path.write_text("[\n" + ",\n".join(chunks) + "\n]\n")
    starts, line = [], 2
    for chunk in chunks:
        starts.append(line)
        line += chunk.count("\n") + 1
    return starts


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def key(sample: Sample):
    return sample.id, sample.messages, sample.images, sample.task


def test_llava_and_messages_formats_give_the_same_sample(folder):
    write_list(folder / "a.json", [llava(task="vqa")])
    reference = read_samples(folder / "a.json")[0]
    assert reference.messages == [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "x"}]
    assert reference.images == [(folder / "a.png").resolve()] and reference.source == f"{folder / 'a.json'}:2"
    variants = {
        "llava.jsonl": llava(task="vqa"),
        "chat.json": chat(task="vqa"),
        "chat_strings.jsonl": {"id": "s0", "task": "vqa", "images": ["a.png"], "messages": [
            {"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "x"}]},
        "chat_inline.jsonl": chat(images=None, task="vqa") | {"messages": [
            {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "\nwhat?"}]},
            {"role": "assistant", "content": "x"}]},
    }
    for name, record in variants.items():
        path = folder / name
        write_list(path, [record]) if name.endswith(".json") else write_lines(path, [record])
        sample = read_samples(path)[0]
        assert key(sample) == key(reference), name
        assert sample.source == f"{path}:{2 if name.endswith('.json') else 1}"


def test_multiple_images_keep_their_order_and_text_only_samples(folder):
    rows = [llava(image=["b.png", "a.png"], question="<image> vs <image>?"), llava(1, image=None, question="hi"),
            {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "yo"}, {"from": "human", "value": "and?"},
                               {"from": "gpt", "value": "done"}]}]
    write_list(folder / "m.json", rows)
    samples = read_samples(folder / "m.json")
    assert samples[0].images == [(folder / "b.png").resolve(), (folder / "a.png").resolve()]
    assert samples[1].images == [] and samples[2].id == "m-2" and len(samples[2].messages) == 5
    with pytest.raises(DataError, match=r"m\.json:2: image: 2 images, but this model family takes at most 1"):
        read_samples(folder / "m.json", max_images_per_sample=1)


def test_image_folder_task_override_and_jsonl_line_numbers(folder):
    data = folder / "sub"
    data.mkdir()
    write_lines(data / "d.jsonl", [llava(0, task="a"), "", "  ", llava(1, task="b")])
    with pytest.raises(DataError, match=r"d\.jsonl:1: image: file not found: .*sub/a\.png"):
        read_samples(data / "d.jsonl")  # default: relative to the file's directory
    samples = read_samples(data / "d.jsonl", image_folder=folder)
    assert [s.task for s in samples] == ["a", "b"] and samples[1].source.endswith("d.jsonl:4")
    assert [s.task for s in read_samples(data / "d.jsonl", image_folder=folder, task="ocr")] == ["ocr", "ocr"]


BAD_RECORDS = [
    ("not an object", "record: expected a JSON object, got string"),
    ({"id": 1}, "conversations: missing: a sample needs 'conversations'"),
    ({"conversations": "hello"}, "conversations: expected a non-empty list of {from, value} turns, got string"),
    ({"conversations": []}, "conversations: expected a non-empty list of {from, value} turns, got an empty list"),
    ({"conversations": ["x"]}, "conversations[0]: expected an object with 'from' and 'value'"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from: 'bot' is not one of"),
    ({"conversations": [{"value": "x"}]}, "conversations[0].from: None is not one of"),
    ({"conversations": [{"from": "human", "value": 3}]}, "conversations[0].value: expected a string, got int"),
    ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     "conversations[0].from: 'assistant' where 'user' was expected"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]},
     "conversations[1].from: 'user' where 'assistant' was expected"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "conversations: no assistant reply"),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "x"}]},
     "conversations: no assistant reply"),
    (llava(answer="<image>", question="<image>"), "conversations[1]: <image> in an assistant reply"),
    (llava(image="missing.png"), "image: file not found: "),
    (llava(image=["a.png", "missing.png"], question="<image><image>"), "image[1]: file not found: "),
    (llava(question="no placeholder"), "conversations: 0 <image> placeholder(s) for 1 image(s) in 'image'; "
                                       "put <image> where the image goes, or set auto_insert_image_token"),
    (llava(image=["a.png", "b.png"], question="q"),
     "conversations: 0 <image> placeholder(s) for 2 image(s) in 'image'; put one <image> where each"),
    (llava(question="<image><image>"), "conversations: 2 <image> placeholder(s) for 1 image(s)"),
    (llava(image=None), "conversations: 1 <image> placeholder(s) for 0 image(s)"),
    (llava(image=5), "image: expected a path, a {'path': ...} object or a list of them, got int"),
    (llava(image=[""]), "image[0]: expected a non-empty path string"),
    (llava(images=["a.png"]), "images: give either 'image' or 'images', not both"),
    (llava(task=5), "task: expected a non-empty string, got 5"),
    (llava(id=[1]), "id: expected a string or an integer, got list"),
    (llava(messages=[]), "messages: give either 'conversations' (LLaVA) or 'messages', not both"),
    (chat(messages=[{"role": "bot", "content": "x"}]), "messages[0].role: 'bot' is not one of"),
    (chat(messages=[{"role": "user", "content": 3}]), "messages[0].content: expected a string or a list of parts"),
    (chat(messages=[{"role": "user", "content": [{"type": "video"}]}]), "messages[0].content[0]: expected"),
    (chat(messages=[{"role": "user", "content": [{"type": "image", "url": "http://x/a.png"}]}]),
     "messages[0].content[0]: remote or inline image"),
    (chat(images=["a.png"]) | {"messages": [
        {"role": "user", "content": [{"type": "image", "path": "a.png"}]}, {"role": "assistant", "content": "x"}]},
     "images: images are given both here and inside message parts"),
    (chat(image_parts=2), "messages: 2 <image> placeholder(s) for 1 image(s) in 'images'"),
    (chat(images=["missing.png"]), "images[0]: file not found"),
]


@pytest.mark.parametrize(("record", "expected"), BAD_RECORDS, ids=[e.split(":")[0] + f"-{i}" for i, (_, e) in
                                                                  enumerate(BAD_RECORDS)])
def test_each_bad_record_names_file_line_and_field(folder, record, expected):
    path = folder / "bad.json"
    starts = write_list(path, [llava(), record, llava(2)])
    with pytest.raises(DataError) as info:
        read_samples(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"1 of 3 samples in {path} are invalid (on_error='skip' drops them):"
    assert lines[1].startswith(f"{path}:{starts[1]}: {expected}"), lines[1]
    samples, report = read_samples_with_report(path, on_error="skip")
    assert [s.id for s in samples] == ["s0", "s2"] and report.skipped == 1


def test_malformed_json_lines_are_each_reported_and_skippable(folder):
    path = write_lines(folder / "broken.jsonl", [llava(0), "{not json", llava(2), "[1, 2]", '{"id": 3,}'])
    with pytest.raises(DataError) as info:
        read_samples(path)
    message = str(info.value)
    assert f"{path}:2: record: not valid JSON: Expecting property name" in message
    assert f"{path}:4: record: expected a JSON object, got list" in message
    assert f"{path}:5: record: not valid JSON" in message
    samples, report = read_samples_with_report(path, on_error="skip")
    assert [s.id for s in samples] == ["s0", "s2"]
    assert report.reasons == {"malformed JSON": 2, "not an object": 1}


@pytest.mark.parametrize(("text", "expected"), [
    ('[\n {"id": 1},\n {"b": \n', r":4: not valid JSON: Expecting value"),
    ('[\n {"id": 1}\n {"id": 2}\n]', r":3: not valid JSON: expected ',' or ']' after the sample that starts on line 2"),
    ('[\n {"id": 1}\n', r":3: not valid JSON: the list is not closed"),
    ('[{"id": 1}]\n\n[]', r":3: not valid JSON: extra data after the closing"),
    ('{\n  "id": 1,\n  "conversations": []\n}\n', r":1: the file holds one JSON object; expected a list"),
    ("hello", r":1: expected a JSON list of samples"),
    ("\n\n", r": the file is empty"),
    ("[\n]", r": no samples \(the list is empty\)"),
])
def test_unreadable_json_files_fail_with_a_line(folder, text, expected):
    path = folder / "broken.json"
    path.write_text(text)
    for mode in ("fail", "skip"):
        with pytest.raises(DataError, match=f"^{path}{expected}"):
            read_samples(path, on_error=mode)


def test_line_numbers_of_a_compact_list_and_crlf(folder):
    path = folder / "compact.json"
    path.write_text("[" + ", ".join(json.dumps(llava(i)) for i in range(3)) + "]")
    assert [s.source for s in read_samples(path)] == [f"{path}:1"] * 3
    path.write_text("\ufeff[\r\n" + ",\r\n".join(json.dumps(llava(i)) for i in range(3)) + "\r\n]\r\n")  # BOM too
    assert [s.source for s in read_samples(path)] == [f"{path}:{n}" for n in (2, 3, 4)]


def test_skip_mode_counts_groups_and_logs(folder, caplog):
    path = folder / "s.json"
    write_list(path, [llava(0), llava(1, image="missing.png"), llava(2, question="plain"), llava(3),
                      llava(4, image="gone.png")])
    with caplog.at_level(logging.WARNING, logger="asymlora.data.reader"):
        samples, report = read_samples_with_report(path, on_error="skip")
    assert [s.id for s in samples] == ["s0", "s3"]
    assert (report.total, report.kept, report.skipped) == (5, 2, 3)
    assert report.reasons == {"missing image file": 2, "<image> count mismatch": 1}
    assert report.summary().startswith(f"{path}: kept 2 of 5 samples; skipped 3: missing image file: 2 (e.g. {path}:")
    assert report.summary() in caplog.text


def test_auto_insert_image_token_only_for_a_single_image(folder):
    path = folder / "auto.json"
    write_list(path, [llava(0, question="plain"), llava(1, image=["a.png", "b.png"], question="two")])
    samples, report = read_samples_with_report(path, on_error="skip", auto_insert_image_token=True)
    assert [s.id for s in samples] == ["s0"] and report.reasons == {"<image> count mismatch": 1}
    assert samples[0].messages[0]["content"] == "<image>\nplain"


def test_skip_mode_with_nothing_left_still_fails(folder):
    write_list(folder / "none.json", [llava(i, image="missing.png") for i in range(2)])
    with pytest.raises(DataError, match="none of the 2 samples in .* is valid"):
        read_samples(folder / "none.json", on_error="skip")


def test_fail_mode_lists_all_problems_up_to_a_limit(folder):
    starts = write_list(folder / "many.json", [llava(i, image="missing.png") for i in range(25)])
    with pytest.raises(DataError) as info:
        read_samples(folder / "many.json")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("none of the 25 samples") and len(lines) == 1 + 20 + 2
    assert [line.split(": ")[0] for line in lines[1:21]] == [f"{folder / 'many.json'}:{n}" for n in starts[:20]]
    assert lines[21] == "and 5 more" and lines[22].startswith(f"(relative image paths resolve against {folder}")


def test_bad_arguments(folder):
    write_list(folder / "ok.json", [llava()])
    with pytest.raises(ConfigError, match="on_error: 'ignore' is not one of"):
        read_samples(folder / "ok.json", on_error="ignore")
    with pytest.raises(ConfigError, match="max_images_per_sample"):
        read_samples(folder / "ok.json", max_images_per_sample=-1)
    with pytest.raises(DataError, match="data file not found"):
        read_samples(folder / "nope.json")
    unchecked = read_samples(folder / "ok.json", check_images=False, image_folder="/nonexistent")
    assert unchecked[0].images == [Path("/nonexistent/a.png")]


# ms-swift's documented multimodal record: string content with <image> placeholders and an `images` list
# of paths (its loader also takes HF datasets' image objects, {"bytes": ..., "path": ...}).
def swift(images, question="<image>\nwhat?", **extra):
    return {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": question},
                         {"role": "assistant", "content": "x"}], "images": images} | extra


def test_ms_swift_records_with_path_objects_or_strings(folder):
    rows = [swift([{"path": "a.png"}]), swift(["a.png"]), swift([{"bytes": None, "path": "a.png"}]),
            swift([{"path": "b.png"}, "a.png"], question="<image><image>same?"), swift([], question="hi")]
    write_lines(folder / "swift.jsonl", rows)
    samples = read_samples(folder / "swift.jsonl")
    assert samples[0].messages == [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "x"}]
    assert [key(s)[1:] for s in samples[:3]] == [key(samples[0])[1:]] * 3
    assert samples[0].images == [(folder / "a.png").resolve()]
    assert samples[3].images == [(folder / "b.png").resolve(), (folder / "a.png").resolve()] and samples[4].images == []


@pytest.mark.parametrize(("images", "expected"), [
    ([{"bytes": "iVBOR"}], "images[0]: embedded image bytes: write the image to a file and give its 'path'"),
    ([{"url": "a.png"}], "images[0]: expected an object with a non-empty 'path'"),
    (["https://x/a.png"], "images[0]: remote or inline image 'https://x/a.png'"),
    ([{"path": "gone.png"}], "images[0]: file not found"),
])
def test_ms_swift_image_errors_name_the_field(folder, images, expected):
    write_lines(folder / "bad.jsonl", [swift(["a.png"]), swift(images)])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {re.escape(expected)}"):
        read_samples(folder / "bad.jsonl")


# LLaMA-Factory's data/README.md: mllm_demo (sharegpt formatting, OpenAI-style role/content tags, an
# images column), the sharegpt defaults (from/value, human/gpt) and the alpaca formatting.
MLLM_DEMO = {"file_name": "mllm_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


def test_llamafactory_sharegpt_records(folder):
    demo = RecordFormat.from_registry(MLLM_DEMO, "dataset_info.json: mllm_demo")
    assert demo.columns == {"messages": "messages", "system": None, "images": "images"} and demo.tags["system_tag"] == "system"
    write_list(folder / "demo.json", [
        {"messages": [{"content": "<image>\nwhat?", "role": "user"}, {"content": "x", "role": "assistant"}],
         "images": ["a.png"]}])
    reference = read_samples(folder / "demo.json", record_format=demo)[0]
    assert key(reference)[1:3] == ([{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "x"}],
                                   [(folder / "a.png").resolve()])
    default = RecordFormat.from_registry({"formatting": "sharegpt", "columns": {"system": "sys", "images": "pics"}}, "x")
    write_list(folder / "sg.json", [
        {"conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "x"}],
         "sys": "be brief", "pics": ["a.png"]},
        {"conversations": [{"from": "system", "value": "own"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "yo"}], "sys": "column"}])
    samples = read_samples(folder / "sg.json", record_format=default)
    assert samples[0].messages == [{"role": "system", "content": "be brief"}, *reference.messages]
    assert samples[0].images == reference.images
    assert samples[1].messages[0] == {"role": "system", "content": "own"} and len(samples[1].messages) == 3


def test_llamafactory_alpaca_records(folder):
    alpaca = RecordFormat.from_registry({"file_name": "d.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "history": "history", "images": "images"}}, "x")
    write_list(folder / "al.json", [
        {"instruction": "<image>\nwhat?", "input": "", "output": "x", "images": ["a.png"]},
        {"instruction": "name it", "input": "<image>", "output": "y", "images": ["b.png"],
         "history": [["hi", "yo"]]}])
    first, second = read_samples(folder / "al.json", record_format=alpaca)
    assert first.messages == [{"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "x"}]
    assert second.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                               {"role": "user", "content": "name it\n<image>"}, {"role": "assistant", "content": "y"}]
    assert second.images == [(folder / "b.png").resolve()]


@pytest.mark.parametrize(("record", "expected"), [
    ({"messages": [{"role": "observation", "content": "r"}]}, "messages[0].role: 'observation': tool turns"),
    ({"messages": [{"role": "human", "content": "r"}]}, "messages[0].role: 'human' is not one of ['user', 'assistant'"),
    ({"messages": [{"role": "user", "text": "r"}]}, "messages[0].content: expected a string, got null"),
    ({"messages": [{"role": "assistant", "content": "r"}]}, "messages[0].role: 'assistant' where 'user'"),
    ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], "images": "a.png",
      "sys": "s"}, None),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], "sys": "s"},
     "messages[1].role: 'user' where 'assistant'"),
    ({"conversations": []}, "messages: missing"),
])
def test_llamafactory_errors_name_the_registry_columns(folder, record, expected):
    fmt = RecordFormat.from_registry(MLLM_DEMO | {"columns": {"messages": "messages", "images": "images",
                                                              "system": "sys"}}, "x")
    write_lines(folder / "lf.jsonl", [record])
    if expected is None:
        assert read_samples(folder / "lf.jsonl", record_format=fmt)[0].messages[0] == {"role": "system", "content": "s"}
        return
    with pytest.raises(DataError, match=rf"lf\.jsonl:1: {re.escape(expected)}"):
        read_samples(folder / "lf.jsonl", record_format=fmt)


@pytest.mark.parametrize(("spec", "expected"), [
    ({"formatting": "openai"}, "x: formatting: 'openai' is not one of ('sharegpt', 'alpaca')"),
    ({"formatting": "sharegpt", "columns": {"tools": "tools"}}, "x: columns.tools: not read by asymlora"),
    ({"columns": {"messages": "m"}}, "x: columns.messages: not read by asymlora (alpaca formatting reads prompt"),
    ({"formatting": "sharegpt", "tags": {"role_tag": 3}}, "x: tags.role_tag: expected a non-empty string, got 3"),
    ({"formatting": "sharegpt", "columns": ["messages"]}, "x: columns: expected an object, got list"),
])
def test_registry_formats_this_reader_does_not_take(spec, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        RecordFormat.from_registry(spec, "x")


def test_task_from_record_given_or_the_records_own(folder, caplog):
    path = folder / "t.jsonl"
    write_lines(path, [llava(0, task="a"), llava(1, task="b"), llava(2, task="a"), llava(3)])
    assert [s.task for s in read_samples(path, on_error="skip", task="from_record")] == ["a", "b", "a"]
    with pytest.raises(DataError, match=r"t\.jsonl:4: task: missing: this dataset's tasks come from the records"):
        read_samples(path, task="from_record")
    with caplog.at_level(logging.WARNING, logger="asymlora.data.reader"):
        samples, report = read_samples_with_report(path, task="a")
    assert [s.task for s in samples] == ["a"] * 4 and report.overridden == 1
    assert report.overridden_example == f"{path}:2: 'b'"
    assert f"1 of 4 samples carry their own 'task' that differs from 'a' (e.g. {path}:2: 'b')" in caplog.text
    assert [s.task for s in read_samples(path)] == ["a", "b", "a", None]
