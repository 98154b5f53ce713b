import json

import pytest
from PIL import Image

from asymlora import ConfigError
from asymlora.data import load_mixture


def make(tmp_path, name, n, task=None):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    rows = [{"id": f"{name}{i}", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": str(i)}]} for i in range(n)]
    (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    return str(tmp_path / f"{name}.json")


def test_tasks_weights_and_max_samples(tmp_path):
    spec = {"name": "m", "datasets": [
        {"name": "a", "path": make(tmp_path, "a", 10), "task": "vqa", "weight": 1.0},
        {"name": "b", "path": make(tmp_path, "b", 30), "task": "ocr", "weight": 3.0, "max_samples": 20},
        {"name": "c", "path": make(tmp_path, "c", 5), "task": "vqa"},
    ]}
    mixture = load_mixture(spec)
    assert mixture.tasks == ["vqa", "ocr"]
    samples = mixture.load(seed=1)
    assert [s.task for s in samples].count("ocr") == 20 and len(samples) == 35
    assert [s.id for s in samples] == [s.id for s in mixture.load(seed=1)]
    assert [s.id for s in samples] != [s.id for s in mixture.load(seed=2)]
    weights = mixture.sampling_weights(samples)
    share = {d: sum(w for w, s in zip(weights, samples) if s.dataset == d) for d in "abc"}
    assert share["b"] == pytest.approx(3 * share["a"]) and share["c"] == pytest.approx(share["a"])
    assert mixture.load(split="val") == []


def test_yaml_file_relative_paths_and_splits(tmp_path):
    make(tmp_path, "train", 4)
    make(tmp_path, "val", 2)
    (tmp_path / "mix.yaml").write_text("name: x\ndatasets:\n  - {name: d, path: train.json, splits: {val: val.json}}\n")
    mixture = load_mixture(tmp_path / "mix.yaml")
    assert mixture.tasks == ["d"] and len(mixture.load("train")) == 4 and len(mixture.load("val")) == 2


@pytest.mark.parametrize(("spec", "message"), [
    ({"datasets": []}, "non-empty list"),
    ({"datasets": [{"name": "a", "path": "x.json", "wieght": 2}]}, r"unknown key 'wieght' \(did you mean 'weight'\?\)"),
    ({"datasets": [{"name": "a"}]}, "exactly one of 'builtin'"),
    ({"datasets": [{"name": "a", "builtin": "easyvqa", "path": "x"}]}, "exactly one of 'builtin'"),
    ({"datasets": [{"name": "a", "path": "x.json", "weight": 0}]}, "weight: must be a number > 0"),
    ({"datasets": [{"name": "a", "builtin": "easyvq"}]}, r"did you mean 'easyvqa'"),
    ({"datasets": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "repeated: \\['a'\\]"),
    ({"datasets": [{"path": "x"}], "mix": 1}, "unknown key 'mix'"),
])
def test_mixture_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_mixture(spec)


def test_builtin_mixture_by_name():
    mixture = load_mixture("mix5")
    assert mixture.tasks == ["easyvqa", "fashion", "digits", "emoji", "ocr"]
    with pytest.raises(ConfigError, match="did you mean 'mix5'"):
        load_mixture("mix4")
