"""docs/reliability.md, kept true: each row of its table is run through the real CLI on the tiny model (or, for
a row covered in another test file, that test must exist); plus the unit cases behind the rows."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import shutil
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from train_fixtures import train_setup, write_dataset

import asymlora
from asymlora.cli import main
from asymlora.data.reader import read_samples_with_report
from asymlora.errors import CheckpointError, ConfigError, DataError
from asymlora.tiny import build_tiny, tiny_llava, tiny_llava_processor

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
TASKS = ["color", "isred"]


def table_rows() -> list[dict[str, str]]:
    """The rows of the 'Inputs and faults' table: case, input, gets, exit, test."""
    text = DOC.read_text(encoding="utf-8").split("## Inputs and faults", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("Case", "") or set(cells[0]) <= {"-"}:
            continue
        assert len(cells) == 5, f"docs/reliability.md: a row needs 5 cells: {line}"
        rows.append(dict(zip(("case", "input", "gets", "exit", "test"), cells)))
    return rows


ROWS = table_rows()


# ---------------------------------------------------------------------------------------------- the world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model, another one (other weights), a two-task dataset, a task-routed adapter, a
    router-gated one and a training config over them."""
    root = tmp_path_factory.mktemp("reliability")
    config = train_setup(root, method="asymlora", max_steps=1, per_device_train_batch_size=2, save_steps=100,
                         logging_steps=1)
    base = Path(config["model"]["path"])
    other = build_tiny(root / "other", seed=1)
    mixture_file = root / "mixture.yaml"
    mixture_file.write_text(yaml.safe_dump(config["data"]["mixture"]))
    adapters = {}
    for name, extra in (("task", {"method": "asymlora"}), ("router", {"method": "asymlora_moe", "num_experts": 2,
                                                                    "routing": "dense"})):
        model = asymlora.get_model(tiny_llava(0), asymlora.AsymLoraConfig(tasks=TASKS, r=4, **extra))
        with torch.no_grad():
            for layer in model.adapter_layers.values():
                layer.B_bank.normal_(std=0.1)
        model.save_pretrained(root / name)
        adapters[name] = root / name
    config_file = root / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return {"root": root, "base": base, "other": other, "config": config, "config_file": config_file,
            "mixture": mixture_file, **adapters}


def _copy_adapter(world, tmp_path: Path, name: str = "task") -> Path:
    copy = tmp_path / f"{name}-copy"
    shutil.copytree(world[name], copy)
    return copy


def _config_with(world, tmp_path: Path, mixture: dict, **data) -> Path:
    values = json.loads(json.dumps(world["config"]))
    values["data"]["mixture"] = mixture
    values["data"].update(data)
    values["training"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _bad_image_config(world, tmp_path: Path, **data) -> Path:
    mixture = write_dataset(tmp_path / "data", n=8)
    (tmp_path / "data" / "images" / "0.png").write_text("not an image, named .png")
    return _config_with(world, tmp_path, mixture, **data)


# --------------------------------------------------------------------------------------------- the cases
def case_image_fail(world, tmp_path, monkeypatch):
    return [["train", str(_bad_image_config(world, tmp_path))]]


def case_image_skip(world, tmp_path, monkeypatch):
    return [["train", str(_bad_image_config(world, tmp_path, on_error="skip"))]]


def case_bad_training_type(world, tmp_path, monkeypatch):
    return [["train", str(world["config_file"]), "training.max_steps=abc"]]


def case_bad_training_range(world, tmp_path, monkeypatch):
    return [["train", str(world["config_file"]), "training.learning_rate=-1"]]


def case_bad_training_choice(world, tmp_path, monkeypatch):
    return [["train", str(world["config_file"]), "training.lr_scheduler_type=cosin"]]


def case_list_yaml(world, tmp_path, monkeypatch):
    (tmp_path / "list.yaml").write_text("- model\n- training\n")
    return [["train", str(tmp_path / "list.yaml"), "training.max_steps=1"]]


def case_empty_yaml(world, tmp_path, monkeypatch):
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    return [["train", str(tmp_path / "empty.yaml")]]


def case_output_dir_file(world, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    return [["train", str(world["config_file"]), f"training.output_dir={tmp_path / 'a-file'}"]]


def case_out_file(world, tmp_path, monkeypatch):
    out = tmp_path / "a-file"
    out.write_text("x")
    model, adapter = ["--model", str(world["base"])], ["--adapter", str(world["task"])]
    return [["merge", *model, *adapter, "--task", "color", "--out", str(out)],
            ["export", *model, *adapter, "--task", "color", "--out", str(out)],
            ["eval", *model, *adapter, "--mixture", str(world["mixture"]), "--out", str(out / "sub")],
            ["analyze", *model, *adapter, "--mixture", str(world["mixture"]), "--out", str(out)]]


def case_truncated_safetensors(world, tmp_path, monkeypatch):
    cut = _copy_adapter(world, tmp_path)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return [["params", "--model", str(world["base"]), "--adapter", str(cut)]]


def case_refused_merge(world, tmp_path, monkeypatch):
    common = ["--model", str(world["base"]), "--adapter", str(world["router"]), "--task", "color"]
    return [["merge", *common, "--out", str(tmp_path / "merged")],
            ["export", *common, "--out", str(tmp_path / "peft")]]


def case_nan_adapter(world, tmp_path, monkeypatch):
    poisoned = _copy_adapter(world, tmp_path)
    weights = poisoned / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "B_bank" in k)[0]
    tensors[key][0, 0, 0] = float("nan")
    save_file(tensors, weights)
    return [["params", "--model", str(world["base"]), "--adapter", str(poisoned)]]


def case_wrong_base(world, tmp_path, monkeypatch):
    return [["params", "--model", str(world["other"]), "--adapter", str(world["task"])]]


def _every_command(world, tmp_path, model: str) -> list[list[str]]:
    common = ["--model", model, "--adapter", str(world["task"])]
    mixture = ["--mixture", str(world["mixture"]), "--split", "train"]
    return [["merge", *common, "--task", "color", "--out", str(tmp_path / "merged")],
            ["export", *common, "--task", "color", "--out", str(tmp_path / "peft")],
            ["eval", *common, *mixture, "--max-samples", "1", "--max-new-tokens", "1", "--out", str(tmp_path / "e")],
            ["params", *common],
            ["analyze", *common, *mixture, "--samples-per-task", "1", "--batch-size", "1", "--out",
             str(tmp_path / "a")],
            ["train", str(world["config_file"]), f"model.path={model}", f"training.output_dir={tmp_path / 'run'}"]]


def case_model_default(world, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "empty-cache"))
    return _every_command(world, tmp_path, "default")


def case_model_tiny(world, tmp_path, monkeypatch):
    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "cache"))
    return _every_command(world, tmp_path, "tiny")


def case_debug(world, tmp_path, monkeypatch):
    (tmp_path / "list.yaml").write_text("- model\n")
    return [["--debug", "train", str(tmp_path / "list.yaml")], ["train", str(tmp_path / "list.yaml"), "--debug"]]


CASES = {name[len("case_"):].replace("_", "-"): fn for name, fn in globals().items() if name.startswith("case_")}


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Exit code and everything the command printed (stdout, stderr, warnings, log records)."""
    out, err, logs = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(out), redirect_stderr(err):
            warnings.simplefilter("always")
            code = main(argv)
    finally:
        logging.getLogger().removeHandler(handler)
    printed = "\n".join(f"{w.category.__name__}: {w.message}" for w in caught)
    return code, "\n".join([out.getvalue(), err.getvalue(), printed, logs.getvalue()])


def test_table_names_each_case_once():
    names = [row["case"] for row in ROWS]
    assert len(names) == len(set(names)), names
    walked = {row["case"] for row in ROWS if row["test"] == "test_reliability"}
    assert walked == set(CASES), f"rows without a case: {walked - set(CASES)}; cases without a row: " \
                                 f"{set(CASES) - walked}"


@pytest.mark.parametrize("row", ROWS, ids=[row["case"] for row in ROWS])
def test_row(row, world, tmp_path, monkeypatch):
    if row["test"].startswith("pending"):
        pytest.skip(f"{row['case']}: {row['test']}")
    if row["test"] != "test_reliability":  # covered elsewhere: that test must exist
        path, _, name = row["test"].strip("`").partition("::")
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, row["test"]
        return
    fragments = re.findall(r"`([^`]+)`", row["gets"])
    monkeypatch.chdir(tmp_path)
    for argv in CASES[row["case"]](world, tmp_path, monkeypatch):
        code, printed = run_cli(argv)
        assert code == int(row["exit"]), f"{argv}: exit {code}\n{printed[-3000:]}"
        for fragment in fragments:
            assert fragment in printed, f"{argv}: {fragment!r} not in\n{printed[-3000:]}"
        if row["case"] != "debug":
            assert "Traceback" not in printed, printed[-3000:]
        if code == 2:
            command = next(a for a in argv if not a.startswith("-"))
            assert f"asymlora {command}: error: " in printed


# --------------------------------------------------------------------------------------- the unit cases
@pytest.mark.parametrize("content", [b"", b"not an image at all", "png-truncated", "png-corrupt"],
                         ids=["empty", "text", "truncated", "corrupt"])
def test_undecodable_images_are_found_when_reading(tmp_path, content):
    """Every kind of undecodable image: an error naming file:line and the image in fail mode, a counted
    reason in skip mode (read once per file, however many records use it)."""
    mixture = write_dataset(tmp_path, n=4)
    good = (tmp_path / "images" / "1.png").read_bytes()
    if content == "png-truncated":
        content = good[: len(good) // 2]
    elif content == "png-corrupt":
        content = good[:40] + bytes(b ^ 0xFF for b in good[40:])
    (tmp_path / "images" / "0.png").write_bytes(content)
    data = Path(mixture["datasets"][0]["path"])
    with pytest.raises(DataError) as info:
        read_samples_with_report(data)
    assert f"{data}:" in str(info.value) and "cannot decode" in str(info.value)
    assert str(tmp_path / "images" / "0.png") in str(info.value)
    samples, report = read_samples_with_report(data, on_error="skip")
    assert len(samples) == 3 and report.reasons == {"undecodable image": 1}
    assert "undecodable image: 1" in report.summary()


def test_images_are_decoded_once_per_file(tmp_path, monkeypatch):
    from asymlora.data import reader

    mixture = write_dataset(tmp_path, n=4)
    calls = []
    original = reader.image_problem
    monkeypatch.setattr(reader, "image_problem", lambda path: calls.append(path) or original(path))
    for entry in mixture["datasets"]:
        read_samples_with_report(entry["path"])
    assert len(calls) == 8 and len(set(calls)) == 4  # per file read, each image once
    Image.open(calls[0]).verify()


def test_train_config_on_error_reaches_the_reader(tmp_path):
    from asymlora.train.config import TrainConfig
    from asymlora.train.dataset import build_datasets

    mixture = write_dataset(tmp_path / "mine", n=4)
    (tmp_path / "mine" / "images" / "0.png").write_bytes(b"")
    values = train_setup(tmp_path, method="asymlora")
    values["data"].update(mixture=mixture, on_error="skip")
    data = build_datasets(TrainConfig.from_dict(values), tiny_llava_processor(), tasks=TASKS, seed=0)
    assert len(data["train"]) == 6


def test_training_values_follow_the_trainingarguments_types():
    from asymlora.train.config import check_training_value

    for key, value in (("max_steps", -1), ("report_to", []), ("save_strategy", "no"), ("deepspeed", {"a": 1}),
                       ("warmup_steps", 0.1), ("eval_steps", None), ("optim", "adamw_torch")):
        check_training_value(key, value)
    for key, value, message in (("max_steps", -2, "or -1: not set"), ("bf16", "yes", "true or false"),
                                ("seed", 1.5, "an integer"), ("report_to", [1], "a list"),
                                ("learning_rate", float("inf"), "finite"), ("optim", "adamw", "one of")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_training_value(key, value)


def test_path_errors_of_any_command_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["build-tiny", "--out", str(tmp_path / "file" / "tiny")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path / "file") in err


def test_base_fingerprint_tolerates_dtype_and_merge(tmp_path):
    """The same base loaded in bfloat16 matches; a merged model records its base weights, not the merged ones."""
    model = asymlora.get_model(tiny_llava(0), asymlora.AsymLoraConfig(method="asymlora", tasks=TASKS, r=4))
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.B_bank.normal_(std=0.5)
    before = model.adapter_manifest()["base_model"]["weight_samples"]
    model.merge(task="color")
    assert model.adapter_manifest()["base_model"]["weight_samples"] == before
    model.unmerge()
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asymlora.load(tiny_llava(0).to(torch.bfloat16), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="saved on base model"):
        asymlora.load(tiny_llava(1), tmp_path / "adapter")


def test_damaged_adapter_files_name_the_file(tmp_path):
    model = asymlora.get_model(tiny_llava(0), asymlora.AsymLoraConfig(tasks=TASKS, r=4))
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        asymlora.load(tiny_llava(0), tmp_path / "adapter")
