"""Asking a model about an image: the answer API, `asymlora chat` (one-shot and the stdin loop) and
`asymlora predict` on unlabeled mixed-task records, with the errors bad input gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_fixtures import COLORS, train_setup

import asymlora
from asymlora.cli import main
from asymlora.data import read_samples
from asymlora.errors import ConfigError, DataError
from asymlora.inference import Question, expert_load, load_pipeline, task_choices
from asymlora.tiny import build_tiny, tiny_llava, tiny_llava_processor

SRC = Path(__file__).parent.parent / "src"


def _randomised(model):
    """Non-zero B heads, so each task (expert) answers differently."""
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.B_bank.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for name, color in COLORS.items():
        paths.append(root / f"{name}.png")
        Image.new("RGB", (28, 28), color).save(paths[-1])
    return paths


def test_answer_routes_each_question_of_a_mixed_batch_by_its_task(images):
    model = _randomised(asymlora.get_model(tiny_llava(), asymlora.AsymLoraConfig(method="asymlora", tasks=["a", "b"],
                                                                                 r=4)))
    processor = tiny_llava_processor()
    image = images[0]
    alone = {task: asymlora.answer(model, processor, image, "what color?", task=task, max_new_tokens=8)
             for task in ("a", "b")}
    assert alone["a"] != alone["b"]  # the task really routes
    mixed = asymlora.answer_batch(model, processor, [Question("what color?", image, "a"),
                                                     Question("what color?", image, "b")], max_new_tokens=8)
    assert mixed == [alone["a"], alone["b"]]
    # a PIL image answers like its file; an explicit <image> placeholder like the implicit one
    with Image.open(image) as pil:
        assert asymlora.answer(model, processor, pil.copy(), "<image>\nwhat color?", task="a",
                               max_new_tokens=8) == alone["a"]
    with pytest.raises(ConfigError, match=r"routes by task; give one of \['a', 'b'\]"):
        asymlora.answer(model, processor, image, "what color?")
    with pytest.raises(ConfigError, match="'c' is not a task of this adapter"):
        asymlora.answer(model, processor, image, "what color?", task="c")
    with pytest.raises(ConfigError, match="temperature"):
        asymlora.answer(model, processor, image, "what color?", task="a", temperature=-1)
    sampled = []
    for _ in range(2):
        torch.manual_seed(3)
        sampled.append(asymlora.answer(model, processor, image, "what color?", task="a", temperature=1.5,
                                       max_new_tokens=8))
    assert sampled[0] == sampled[1]  # sampling follows torch's seed
    assert expert_load(model, processor, image, "what color?", alone["a"], task="a") is None  # no router


def test_router_gated_adapters_take_no_task_and_report_their_expert_load(images):
    processor = tiny_llava_processor()
    dense = _randomised(asymlora.get_model(tiny_llava(), asymlora.AsymLoraConfig(method="asymlora_moe",
                                                                                 num_experts=3, r=4)))
    assert task_choices(dense) == [None]
    text = asymlora.answer(dense, processor, images[1], "what color?", max_new_tokens=6)
    load = expert_load(dense, processor, images[1], "what color?", text)
    assert len(load["share"]) == 3 and sum(load["share"]) == pytest.approx(1.0)
    assert load["layers"] == len(dense.adapter_layers) and load["tokens"] > 0
    hybrid = asymlora.get_model(tiny_llava(), asymlora.AsymLoraConfig(method="asymlora_moe", routing="hybrid",
                                                                      num_experts=2, tasks=["a", "b"], r=4))
    assert task_choices(hybrid) == [None, "a", "b"]
    asymlora.answer(hybrid, processor, images[1], "what color?", max_new_tokens=2)  # the router alone
    plain = tiny_llava()
    assert asymlora.answer(plain, processor, images[1], "what color?", task="anything", max_new_tokens=4) == \
        asymlora.answer(plain, processor, images[1], "what color?", max_new_tokens=4)


def test_pipeline_base_model_answers_like_the_model_without_the_adapter(tmp_path, images):
    model_dir = build_tiny(tmp_path / "model")
    config = asymlora.AsymLoraConfig(method="asymlora", tasks=["a", "b"], r=4, modules_to_save=["projector"])
    wrapped = _randomised(asymlora.get_model(tiny_llava(), config))
    with torch.no_grad():
        for param in wrapped.base_model.model.multi_modal_projector.parameters():
            param.add_(torch.randn_like(param))  # a trained projector differs from the base one
    wrapped.save_pretrained(tmp_path / "adapter")
    pipe = load_pipeline(tmp_path / "adapter", model=str(model_dir), keep_base=True)
    base, processor = load_pipeline(model=str(model_dir)).model, pipe.processor
    ask = [Question("what color?", image, "b") for image in images]
    adapted = asymlora.answer_batch(pipe.model, processor, ask, max_new_tokens=8)
    expected = asymlora.answer_batch(base, processor, ask, max_new_tokens=8)
    with pipe.base_model() as model:
        assert asymlora.answer_batch(model, processor, ask, max_new_tokens=8) == expected
    assert adapted != expected
    assert asymlora.answer_batch(pipe.model, processor, ask, max_new_tokens=8) == adapted  # restored after
    with pytest.raises(ConfigError, match="keep_base=True"), load_pipeline(tmp_path / "adapter",
                                                                           model=str(model_dir)).base_model():
        pass
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_pipeline(tmp_path, model=str(model_dir))


def test_reader_accepts_unlabeled_records_for_prediction(tmp_path, images):
    record = {"id": "q", "image": str(images[0]), "conversations": [{"from": "human", "value": "<image>\nwhat?"}]}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match="q.jsonl:1: conversations: no assistant reply"):
        read_samples(path)  # training data needs the reply
    assert read_samples(path, require_reply=False)[0].messages == record_messages("<image>\nwhat?")
    system_only = {"messages": [{"role": "system", "content": "be brief"}]}
    path.write_text(json.dumps(system_only) + "\n")
    with pytest.raises(DataError, match="q.jsonl:1: messages: no user turn to answer"):
        read_samples(path, require_reply=False)


def record_messages(question):
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A task-routed adapter (tasks color, isred; two experts) trained for two steps on the tiny model."""
    from asymlora.train import TrainConfig, run_training

    tmp = tmp_path_factory.mktemp("run")
    return run_training(TrainConfig.from_dict(train_setup(tmp, method="asymlora", max_steps=2, save_steps=100)))


def _answers(run, items, **kwargs):
    pipe = load_pipeline(run)  # the base model comes from the run's train_config.yaml
    return asymlora.answer_batch(pipe.model, pipe.processor, items, **kwargs)


def test_chat_one_shot_and_its_errors(run, images, capsys):
    expected = _answers(run, [Question("what color is this?", images[0], "color")])[0]
    assert main(["chat", "--adapter", str(run), "--image", str(images[0]), "--task", "color",
                 "what color is this?"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["chat", "--adapter", str(run), "--image", str(images[0]), "what?"]) == 2
    assert "--task: this adapter routes by task; give one of ['color', 'isred']" in capsys.readouterr().err
    assert main(["chat", "--adapter", str(run), "--image", str(images[0]) + ".missing", "what?"]) == 2
    assert "--image" in capsys.readouterr().err
    model_dir = run.parent / "model"  # no --adapter: the base model answers
    base = load_pipeline(model=str(model_dir))
    expected_base = asymlora.answer(base.model, base.processor, images[1], "what?")
    assert main(["chat", "--model", str(model_dir), "--image", str(images[1]), "what?"]) == 0
    assert capsys.readouterr().out == expected_base + "\n"


def test_chat_loop_reads_questions_and_commands_from_stdin(run, images):
    script = "\n".join([
        "what color is this?",
        "/task isred",
        "is it red?",
        "/task nope",
        f"/image {images[2]}",
        "is it red?",
        "/task",
        "/quit",
        "not asked",
    ]) + "\n"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "asymlora.cli", "chat", "--adapter", str(run), "--image",
                           str(images[0]), "--task", "color", "--max-new-tokens", "6"],
                          input=script, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = _answers(run, [Question("what color is this?", images[0], "color"),
                              Question("is it red?", images[0], "isred"),
                              Question("is it red?", images[2], "isred")], max_new_tokens=6, batch_size=1)
    assert proc.stdout.split("\n") == [*expected, "task: 'isred'; the adapter's tasks: ['color', 'isred']", ""]
    assert "error: /task: 'nope' is not a task of this adapter" in proc.stderr


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_predict_answers_mixed_task_unlabeled_records(run, tmp_path, images, capsys):
    records = [
        {"id": "c0", "image": str(images[0]), "task": "color",
         "conversations": [{"from": "human", "value": "<image>\nwhat color is this?"}]},
        {"id": "r0", "images": [str(images[0])], "task": "isred", "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nis it red?"}]}]},
        {"image": str(images[1]), "conversations": [{"from": "human", "value": "what color is this?"},
                                                    {"from": "gpt", "value": "ignored"}]},
    ]
    data = _write(tmp_path / "questions.jsonl", records)
    out = tmp_path / "preds" / "preds.jsonl"
    assert main(["predict", "--adapter", str(run), "--data", str(data), "--out", str(out), "--task", "color",
                 "--batch-size", "2", "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = _answers(run, [Question("what color is this?", images[0], "color"),
                              Question("is it red?", images[0], "isred"),
                              Question("what color is this?", images[1], "color")], max_new_tokens=6, batch_size=2)
    assert rows == [{"id": "c0", "task": "color", "answer": expected[0]},
                    {"id": "r0", "task": "isred", "answer": expected[1]},
                    {"id": "questions-2", "task": "color", "answer": expected[2]}]
    assert f"wrote 3 answers to {out}" in capsys.readouterr().out


def test_predict_bad_input_names_file_and_line(run, tmp_path, images, capsys):
    good = {"id": "c0", "image": str(images[0]), "task": "color",
            "conversations": [{"from": "human", "value": "<image>\nwhat color is this?"}]}
    no_task = {"id": "x", "image": str(images[0]), "conversations": [{"from": "human", "value": "what?"}]}
    unknown = {**good, "id": "y", "task": "shape"}
    data = _write(tmp_path / "bad.jsonl", [good, no_task, unknown])
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--adapter", str(run), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: task: missing; this adapter routes by task: give the record a 'task' (one of " \
           "['color', 'isred']) or pass --task" in err
    assert "bad.jsonl:3: task: 'shape' is not a task of this adapter" in err
    assert not out.exists()
    _write(data, [good, {**good, "image": "nowhere.png"}, {"id": "z", "messages": [{"role": "system",
                                                                                    "content": "hi"}]}])
    assert main(["predict", "--adapter", str(run), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: image: file not found" in err and "bad.jsonl:3: messages: no user turn to answer" in err
    assert main(["predict", "--adapter", str(run), "--data", str(data), "--out", str(out), "--batch-size", "0"]) == 2
    assert "--batch-size: expected an integer >= 1" in capsys.readouterr().err
    assert not out.exists()
