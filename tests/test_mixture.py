"""Mixture declarations: validation with file/entry/key, task order, deterministic caps, sampling weights."""

import json

import pytest
from PIL import Image

from asymlora import ConfigError, DataError, MissingAssetError
from asymlora.data import load_mixture


def make(root, name, n, task=None, bad=0):
    """A LLaVA JSON file of ``n`` samples (plus ``bad`` with a missing image) over one PNG in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "img.png")
    rows = [{"id": f"{name}{i}", "image": "img.png" if i < n else "gone.png", "conversations": [
        {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": str(i)}]} for i in range(n + bad)]
    if task:
        for row in rows:
            row["task"] = task
    (root / f"{name}.json").write_text(json.dumps(rows))
    return str(root / f"{name}.json")


def test_tasks_order_task_tags_and_deterministic_max_samples(tmp_path):
    spec = {"name": "m", "datasets": [
        {"name": "a", "path": make(tmp_path, "a", 10, task="ignored"), "task": "vqa", "weight": 1.0},
        {"name": "b", "path": make(tmp_path, "b", 30), "task": "ocr", "weight": 3.0, "max_samples": 20},
        {"name": "c", "path": make(tmp_path, "c", 5), "task": "vqa"},
    ]}
    mixture = load_mixture(spec)
    assert mixture.name == "m" and mixture.tasks == ["vqa", "ocr"]
    samples = mixture.load(seed=1)
    assert len(samples) == 35 and {s.task for s in samples[:10]} == {"vqa"}
    assert [(s.dataset, s.task) for s in samples].count(("b", "ocr")) == 20
    kept = [s.id for s in samples if s.dataset == "b"]
    assert kept == sorted(kept, key=lambda i: int(i[1:]))  # a subset in file order
    assert [s.id for s in samples] == [s.id for s in load_mixture(spec).load(seed=1)]
    assert kept != [s.id for s in mixture.load(seed=2) if s.dataset == "b"]
    assert mixture.load(split="val") == []


def test_sampling_weights_give_each_dataset_its_share(tmp_path):
    mixture = load_mixture({"datasets": [
        {"name": "a", "path": make(tmp_path, "a", 10), "weight": 1.0},
        {"name": "b", "path": make(tmp_path, "b", 40), "weight": 3.0},
        {"name": "c", "path": make(tmp_path, "c", 5), "weight": 1},
    ]})
    samples = mixture.load()
    weights = mixture.sampling_weights(samples)
    share = {d: sum(w for w, s in zip(weights, samples) if s.dataset == d) for d in "abc"}
    assert share == pytest.approx({"a": 0.2, "b": 0.6, "c": 0.2}) and sum(weights) == pytest.approx(1.0)
    assert len({w for w, s in zip(weights, samples) if s.dataset == "b"}) == 1  # uniform within a dataset
    samples[0].dataset = "other"
    with pytest.raises(ConfigError, match="dataset 'other', which is not in mixture"):
        mixture.sampling_weights(samples)


def test_yaml_file_relative_paths_splits_and_directories(tmp_path):
    make(tmp_path, "train", 4)
    make(tmp_path, "val", 2)
    make(tmp_path / "dir", "train", 3)
    make(tmp_path / "dir", "test", 1)
    (tmp_path / "dir" / "test.json").rename(tmp_path / "dir" / "test.jsonl")
    (tmp_path / "dir" / "test.jsonl").write_text(
        "\n".join(json.dumps(r) for r in json.loads((tmp_path / "dir" / "test.jsonl").read_text())))
    (tmp_path / "mix.yaml").write_text(
        "datasets:\n"
        "  - {name: d, path: train.json, image_folder: ., splits: {val: val.json}, weight: 2e0}\n"
        "  - {name: e, path: dir, task: d}\n"
        "  - {name: f, path: dir, task: d}\n")
    with pytest.raises(ConfigError, match=r"datasets\[0\] \('d'\) gets task 'd' from its name.*write 'task: d'"):
        load_mixture(tmp_path / "mix.yaml")
    (tmp_path / "mix.yaml").write_text((tmp_path / "mix.yaml").read_text().replace("name: d,", "name: d, task: d,"))
    mixture = load_mixture(str(tmp_path / "mix.yaml"))
    assert mixture.name == "mix" and mixture.tasks == ["d"] and mixture.entries[0].weight == 2.0
    assert [len([s for s in mixture.load(split) if s.dataset == "d"]) for split in ("train", "val", "test")] == [4, 2, 0]
    assert [s.dataset for s in mixture.load("test")] == ["e", "f"]
    assert {s.task for s in mixture.load()} == {"d"}


def test_entry_on_error_skip(tmp_path):
    path = make(tmp_path, "a", 3, bad=2)
    with pytest.raises(DataError, match="2 of 5 samples in .* are invalid"):
        load_mixture({"datasets": [{"path": path}]}).load()
    assert len(load_mixture({"datasets": [{"path": path, "on_error": "skip"}]}).load()) == 3
    assert len(load_mixture({"datasets": [{"path": path}]}).load(on_error="skip")) == 3


def test_builtin_entries_read_the_dataset_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "cache"))
    mixture = load_mixture({"datasets": [{"builtin": "easyvqa", "weight": 2}]})
    assert mixture.entries[0].name == "easyvqa" and mixture.tasks == ["easyvqa"]
    with pytest.raises(MissingAssetError, match="asymlora data build --only easyvqa"):
        mixture.load()
    root = tmp_path / "cache" / "data" / "easyvqa"
    make(root, "train", 3, task="easyvqa")
    make(root, "val", 2, task="easyvqa")
    samples = mixture.load()
    assert len(samples) == 3 and samples[0].images == [(root / "img.png").resolve()]
    assert len(mixture.load("val")) == 2 and mixture.load("test") == []


def test_builtin_mixture_by_name():
    mixture = load_mixture("mix5")
    assert mixture.name == "mix5" and mixture.tasks == ["easyvqa", "fashion", "digits", "emoji", "ocr"]
    assert load_mixture("easyvqa").tasks == ["easyvqa"]
    with pytest.raises(ConfigError, match="did you mean 'mix5'"):
        load_mixture("mix4")


def entry(**values):
    return {"datasets": [{"name": "a", "path": "x.json"} | values]}


@pytest.mark.parametrize(("spec", "message"), [
    ({"datasets": []}, "mixture: datasets: a mixture needs 'datasets:', a non-empty list"),
    ({"datasets": {"a": 1}}, "a non-empty list"),
    ([1], "mixture: expected a name, a YAML path or a mapping, got list"),
    ({"datasets": [{"path": "x"}], "mix": 1}, r"^mixture: unknown key 'mix'; valid keys: name, datasets$"),
    ({"datasets": [{"path": "x"}], "dataset": 1}, r"unknown key 'dataset' \(did you mean 'datasets'\?\)"),
    (entry(wieght=2), r"^mixture: datasets\[0\]: unknown key 'wieght' \(did you mean 'weight'\?\)"),
    ({"datasets": ["x.json"]}, r"datasets\[0\]: expected a mapping"),
    ({"datasets": [{"name": "a"}]}, "exactly one of 'builtin'"),
    ({"datasets": [{"name": "a", "builtin": "easyvqa", "path": "x"}]}, "exactly one of 'builtin'"),
    ({"datasets": [{"name": "a", "builtin": "easyvq"}]}, r"builtin: 'easyvq' is not one of .*did you mean 'easyvqa'"),
    ({"datasets": [{"builtin": "easyvqa", "image_folder": "x"}]}, r"image_folder: only for 'path' entries"),
    (entry(path=3), r"datasets\[0\]\.path: expected a non-empty string"),
    (entry(weight=0), r"datasets\[0\]\.weight: must be a finite number > 0, got 0"),
    (entry(weight=-1.5), "weight: must be a finite number > 0"),
    (entry(weight=float("nan")), "weight: must be a finite number > 0"),
    (entry(weight="2"), "weight: must be a finite number > 0"),
    (entry(weight=True), "weight: must be a finite number > 0"),
    (entry(max_samples=0), r"max_samples: must be an integer >= 1, got 0"),
    (entry(max_samples=2.5), r"max_samples: must be an integer >= 1"),
    (entry(max_images_per_sample=-1), r"max_images_per_sample: must be an integer >= 0"),
    (entry(on_error="ignore"), r"on_error: 'ignore' is not one of \('fail', 'skip'\)"),
    (entry(auto_insert_image_token="yes"), "auto_insert_image_token: must be true or false"),
    (entry(splits={"dev": "d.json"}), r"splits: expected a mapping from \('train', 'val', 'test'\)"),
    (entry(task=""), r"task: expected a non-empty string"),
    (entry(name="from_record"), r"datasets\[0\]\.task: 'from_record' is not a task name"),
    ({"datasets": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, r"repeated: \['a'\]"),
    ({"datasets": [{"path": "x/a.json"}, {"path": "y/a.json"}]}, r"repeated: \['a'\]"),
    ({"datasets": [{"name": "vqa", "path": "x"}, {"name": "b", "path": "y", "task": "vqa"}]},
     r"datasets\[0\] \('vqa'\) gets task 'vqa' from its name, and datasets\[1\] \('b'\) has the same task"),
])
def test_mixture_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_mixture(spec)


def test_errors_name_the_yaml_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("datasets:\n  - {name: a, path: x.json, max_sample: 3}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: datasets\[0\]: unknown key 'max_sample' \(did you mean "
                                          r"'max_samples'\?\)"):
        load_mixture(path)
    path.write_text("- a\n")
    with pytest.raises(ConfigError, match=rf"^{path}: a mixture is a mapping with 'name' and 'datasets'"):
        load_mixture(path)
    path.write_text("datasets: [\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 2, column 1: not valid YAML \(expected"):
        load_mixture(path)
    with pytest.raises(ConfigError, match="not found"):
        load_mixture(tmp_path / "missing.yaml")
    path.write_text("datasets:\n  - {name: a, path: nowhere}\n")
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(ConfigError, match="dataset 'a' has no train data"):
        load_mixture(path).load()
    with pytest.raises(ConfigError, match="split: 'dev' is not one of"):
        load_mixture(path).load("dev")


def test_shared_task_when_every_entry_names_it(tmp_path):
    mixture = load_mixture({"datasets": [{"name": "a", "path": "x", "task": "vqa"},
                                         {"name": "b", "path": "y", "task": "ocr"},
                                         {"name": "c", "path": "z", "task": "vqa"}]})
    assert mixture.tasks == ["vqa", "ocr"]


def registry_dir(root):
    """LLaMA-Factory's layout: data/dataset_info.json beside mllm_demo.json, images under mllm_demo_data/ (image
    paths relative to the registry's folder, LLaMA-Factory's media_dir default), and an alpaca dataset in a
    subfolder."""
    (root / "mllm_demo_data").mkdir(parents=True)
    (root / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "mllm_demo_data" / "1.jpg")
    demo = [{"messages": [{"content": "<image>Who is he?", "role": "user"}, {"content": "A player.", "role": "assistant"},
                          {"content": "Why is he here?", "role": "user"}, {"content": "To play.", "role": "assistant"}],
             "images": ["mllm_demo_data/1.jpg"]}] * 3
    (root / "mllm_demo.json").write_text(json.dumps(demo, indent=2))
    alpaca = [{"instruction": "<image>Describe.", "output": "A square.", "images": ["mllm_demo_data/1.jpg"]}] * 2
    (root / "sub" / "alp.json").write_text(json.dumps(alpaca))
    registry = {
        "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}},
        "alp": {"file_name": "sub/alp.json", "columns": {"prompt": "instruction", "response": "output",
                                                         "images": "images"}},
        "hub": {"hf_hub_url": "org/data"},
        "dpo": {"file_name": "mllm_demo.json", "ranking": True, "formatting": "sharegpt"},
        "nofile": {"formatting": "sharegpt"},
        "gone": {"file_name": "gone.json"},
    }
    (root / "dataset_info.json").write_text(json.dumps(registry, indent=2))
    return root / "dataset_info.json"


def test_llamafactory_registry_entries(tmp_path):
    registry = registry_dir(tmp_path / "data")
    (tmp_path / "mix.yaml").write_text("datasets:\n  - {registry: data/dataset_info.json, name: mllm_demo, task: vqa}\n"
                                       "  - {registry: data/dataset_info.json, name: alp, weight: 2}\n")
    mixture = load_mixture(tmp_path / "mix.yaml")
    assert mixture.tasks == ["vqa", "alp"] and mixture.entries[0].registry == str(registry)
    samples = mixture.load()
    assert [(s.dataset, s.task) for s in samples] == [("mllm_demo", "vqa")] * 3 + [("alp", "alp")] * 2
    image = (tmp_path / "data" / "mllm_demo_data" / "1.jpg").resolve()
    assert samples[0].images == [image] and samples[3].images == [image]  # alp.json is in sub/: the registry's folder
    assert [m["role"] for m in samples[0].messages] == ["user", "assistant"] * 2
    assert samples[3].messages == [{"role": "user", "content": "<image>Describe."},
                                   {"role": "assistant", "content": "A square."}]
    assert samples[0].source == f"{tmp_path / 'data' / 'mllm_demo.json'}:2"
    assert mixture.load("val") == []


@pytest.mark.parametrize(("name", "message"), [
    ("mllm_dem", r"datasets\[0\]\.name: 'mllm_dem' is not a dataset of .*dataset_info\.json \(did you mean 'mllm_demo'"),
    ("hub", r"dataset_info\.json: hub: hf_hub_url: a dataset that is not a local file; download it"),
    ("dpo", r"dataset_info\.json: dpo: ranking: preference data"),
    ("nofile", r"dataset_info\.json: nofile: file_name: expected the data file's name"),
    ("gone", r"dataset_info\.json: gone: file_name: .*gone\.json is not a file"),
])
def test_registry_errors_name_the_registry_and_dataset(tmp_path, name, message):
    registry = registry_dir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_mixture({"datasets": [{"registry": str(registry), "name": name}]})


def test_registry_entry_errors(tmp_path):
    registry = str(registry_dir(tmp_path))
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.name: a 'registry' entry names the dataset"):
        load_mixture({"datasets": [{"registry": registry}]})
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.splits: a 'registry' entry reads its dataset as the train"):
        load_mixture({"datasets": [{"registry": registry, "name": "alp", "splits": {"val": "x.json"}}]})
    with pytest.raises(ConfigError, match="exactly one of 'builtin' .*, 'path' .* or 'registry'"):
        load_mixture({"datasets": [{"registry": registry, "name": "alp", "path": "x.json"}]})
    with pytest.raises(ConfigError, match=r"registry: .*nowhere\.json not found"):
        load_mixture({"datasets": [{"registry": str(tmp_path / "nowhere.json"), "name": "alp"}]})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        load_mixture({"datasets": [{"registry": str(tmp_path / "broken.json"), "name": "alp"}]})


def mixed_tasks(path, tasks):
    """A JSON Lines file with one LLaVA record per task name (None: a record without a task)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path.parent / "img.png")
    rows = [{"id": f"r{i}", "image": "img.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                                   {"from": "gpt", "value": str(i)}]}
            | ({"task": task} if task is not None else {}) for i, task in enumerate(tasks)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_task_from_record_sets_the_mixture_tasks_and_reaches_the_adapter_check(tmp_path):
    from asymlora.train import TrainConfig

    spec = {"datasets": [
        {"name": "mixed", "path": mixed_tasks(tmp_path / "m.jsonl", ["ocr", "vqa", "ocr", "count"]),
         "task": "from_record"},
        {"name": "more", "path": make(tmp_path, "more", 2), "task": "vqa"},
        {"name": "caps", "path": make(tmp_path, "caps", 2)}]}
    mixture = load_mixture(spec)
    assert mixture.entries[0].from_record and mixture.tasks == ["ocr", "vqa", "count", "caps"]
    assert [(s.dataset, s.task) for s in mixture.load()][:4] == [("mixed", "ocr"), ("mixed", "vqa"), ("mixed", "ocr"),
                                                                 ("mixed", "count")]
    config = TrainConfig.from_dict({"data": {"mixture": spec}, "adapter": {"method": "asymlora", "routing": "task",
                                                                           "tasks": ["ocr", "vqa", "caps"]}})
    with pytest.raises(ConfigError, match=r"adapter\.tasks: \['ocr', 'vqa', 'caps'\] lacks the mixture's tasks \['count'\]"):
        config.adapter_config(load_mixture(config.data.mixture).tasks)


def test_task_from_record_needs_a_task_in_every_record(tmp_path):
    path = mixed_tasks(tmp_path / "m.jsonl", ["ocr", None, "vqa"])
    with pytest.raises(DataError, match=r"m\.jsonl:2: task: missing \(dataset 'm' has task: from_record"):
        _ = load_mixture({"datasets": [{"path": path, "task": "from_record"}]}).tasks
    skipping = load_mixture({"datasets": [{"path": path, "task": "from_record", "on_error": "skip"}]})
    assert skipping.tasks == ["ocr", "vqa"] and [s.task for s in skipping.load()] == ["ocr", "vqa"]
    clash = load_mixture({"datasets": [{"path": mixed_tasks(tmp_path / "x.jsonl", ["vqa"]), "task": "from_record"},
                                       {"name": "vqa", "path": make(tmp_path, "v", 1)}]})
    with pytest.raises(ConfigError, match="dataset 'x' has records of task 'vqa', which dataset 'vqa' gets from its name"):
        _ = clash.tasks


def test_a_named_task_replaces_the_records_own_with_a_warning(tmp_path, caplog):
    path = mixed_tasks(tmp_path / "m.jsonl", ["ocr", "vqa"])
    with caplog.at_level("WARNING", logger="asymlora.data.reader"):
        samples = load_mixture({"datasets": [{"path": path, "task": "ocr"}]}).load()
    assert [s.task for s in samples] == ["ocr", "ocr"]
    assert f"1 of 2 samples carry their own 'task' that differs from 'ocr' (e.g. {path}:2: 'vqa')" in caplog.text
