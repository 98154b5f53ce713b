"""Runs, checkpoints and resume on the tiny model: non-finite updates stop before they reach the weights or a
checkpoint, resume takes only complete checkpoints of the run's own config, and one output dir holds one run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from train_fixtures import train_setup
from transformers import TrainerCallback

from asymlora.errors import CheckpointError, ConfigError, NonFiniteLossError
from asymlora.train import TrainConfig, last_checkpoint, run_training
from asymlora.train.checkpoints import checkpoint_problem, config_differences
from asymlora.train.run_dir import RunDir


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """A finished 4-step run with checkpoints 2 and 4, and its config; tests copy it before changing it."""
    tmp = tmp_path_factory.mktemp("finished")
    values = train_setup(tmp, max_steps=4, save_steps=2, logging_steps=2)
    run_training(TrainConfig.from_dict(values))
    return tmp / "run", values


def _copy(finished: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    run, values = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    values = json.loads(json.dumps(values))
    values["training"]["output_dir"] = str(out)
    return out, values


class Raise(TrainerCallback):
    """Fails the run at a Trainer event (a fault such as a device error at that moment)."""

    def __init__(self, event: str) -> None:
        setattr(self, event, self._raise)

    def _raise(self, *args, **kwargs):
        raise RuntimeError("injected fault")


class PoisonBeforeSave(TrainerCallback):
    """Sets one trainable tensor to NaN at the end of ``step``, before that step's checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            param = next(p for n, p in model.named_parameters() if n.endswith("B_bank"))
            with torch.no_grad():
                param.view(-1)[0] = float("nan")


# ---- 1. non-finite updates ------------------------------------------------------------------------------
def test_non_finite_gradient_stops_before_the_update_naming_a_finite_checkpoint(tmp_path):
    """learning_rate=1e6: the loss of step 2 is finite but its gradient is not. The run stops before that
    update, names checkpoint-1 (all finite), and no checkpoint on disk holds a non-finite tensor."""
    values = train_setup(tmp_path, max_steps=6, save_steps=1, learning_rate=1e6)
    with pytest.raises(NonFiniteLossError, match="gradient norm is nan at step 2") as err:
        run_training(TrainConfig.from_dict(values))
    out = tmp_path / "run"
    assert f"all finite is {out / 'checkpoint-1'};" in str(err.value)
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    assert saved == ["checkpoint-1"]
    assert all(t.isfinite().all() for t in load_file(out / "checkpoint-1" / "adapter_model.safetensors").values())


def test_a_non_finite_tensor_is_never_written(tmp_path):
    values = train_setup(tmp_path, max_steps=4, save_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"B_bank holds NaN or inf after step 4, so .*checkpoint-4 was not "
                                                 r"written.*all finite is .*checkpoint-2;"):
        run_training(TrainConfig.from_dict(values), callbacks=[PoisonBeforeSave(4)])
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_newest_finite_checkpoint_passes_over_a_non_finite_one(finished, tmp_path):
    out, _ = _copy(finished, tmp_path)
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][...] = float("nan")
    save_file(tensors, str(weights))
    skipped: list = []
    assert last_checkpoint(out, skipped=skipped) == out / "checkpoint-2"
    assert skipped == [(out / "checkpoint-4", f"adapter_model.safetensors: tensor {name} holds NaN or inf")]


# ---- 2. complete checkpoints only ---------------------------------------------------------------------
def test_resume_skips_a_checkpoint_whose_trainer_state_was_cut(finished, tmp_path, capsys):
    """A SIGKILL while the Trainer writes trainer_state.json leaves it empty: resume says so and continues
    from the checkpoint before."""
    out, values = _copy(finished, tmp_path)
    (out / "checkpoint-4" / "trainer_state.json").write_bytes(b"")
    values["resume"] = True
    run_training(TrainConfig.from_dict(values))
    printed = capsys.readouterr().out
    assert (f"resume: skipped {out / 'checkpoint-4'}: trainer_state.json is not valid JSON (0 bytes: cut off "
            "while being written)") in printed
    assert f"resume: continuing from {out / 'checkpoint-2'}" in printed
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4  # rewritten


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_a_tensor(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop(next(k for k in sorted(tensors) if k.endswith("A_bank")))
    save_file(tensors, str(path))


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
    (lambda c: (c / "trainer_state.json").write_text('{"log_history": []}'), "holds no global_step"),
    (lambda c: _cut(c / "adapter_config.json"), "adapter_config.json is not valid JSON"),
    (lambda c: (c / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (lambda c: _cut(c / "adapter_model.safetensors"), "adapter_model.safetensors does not open"),
    (lambda c: _drop_a_tensor(c / "adapter_model.safetensors"), "lacks 1 tensor(s) adapter_config.json names"),
    (lambda c: (c / "optimizer.pt").unlink(), "no optimizer.pt"),
    (lambda c: _cut(c / "scheduler.pt"), "scheduler.pt is cut off"),
    (lambda c: (c / "rng_state.pth").unlink(), "no rng_state.pth"),
])
def test_an_incomplete_checkpoint_does_not_count(finished, tmp_path, damage, reason):
    out, values = _copy(finished, tmp_path)
    assert checkpoint_problem(out / "checkpoint-4") is None
    damage(out / "checkpoint-4")
    skipped: list = []
    assert last_checkpoint(out, skipped=skipped) == out / "checkpoint-2"
    assert len(skipped) == 1 and reason in skipped[0][1]
    with pytest.raises(CheckpointError, match=re.escape(f"resume: {out / 'checkpoint-4'}: ") + ".*" + re.escape(reason)):
        run_training(TrainConfig.from_dict({**values, "resume": str(out / "checkpoint-4")}))


def test_last_checkpoint_is_the_highest_by_number(finished, tmp_path):
    out, _ = _copy(finished, tmp_path)
    assert last_checkpoint(tmp_path / "missing") is None
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-10")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-20-old")
    assert last_checkpoint(out) == out / "checkpoint-10"  # by number, not by name


# ---- 3. one run per output dir ------------------------------------------------------------------------
def test_another_run_in_the_dir_is_refused_and_its_files_are_untouched(finished, tmp_path):
    out, values = _copy(finished, tmp_path)
    before = _files(out)
    values["training"].update(seed=8, learning_rate=1e-3)
    for resume in (False, True):
        with pytest.raises(ConfigError, match=f"{out} holds another run \\(training.learning_rate, training.seed "
                                              "differ\\).*replace_run: true"):
            run_training(TrainConfig.from_dict({**values, "resume": resume}))
    assert _files(out) == before


def test_cadence_and_resume_keys_do_not_make_another_run(finished, tmp_path):
    out, values = _copy(finished, tmp_path)
    values["training"].update(save_steps=3, save_total_limit=1, logging_steps=1, report_to=["tensorboard"])
    RunDir(out, TrainConfig.from_dict({**values, "resume": True}).to_dict())  # not refused
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())
    assert config_differences(recorded, {**recorded, "resume": True}) == []
    assert config_differences(recorded, {**recorded, "projector_lr": 2e-3}) == ["projector_lr"]


def test_resume_never_takes_a_checkpoint_of_another_config(finished, tmp_path):
    out, values = _copy(finished, tmp_path)
    recorded = out / "checkpoint-4" / "train_config.yaml"
    other = yaml.safe_load(recorded.read_text())
    other["training"]["learning_rate"] = 1e-3
    recorded.write_text(yaml.safe_dump(other))
    skipped: list = []
    config = TrainConfig.from_dict(values).to_dict()
    assert last_checkpoint(out, config, skipped=skipped) == out / "checkpoint-2"
    assert skipped == [(out / "checkpoint-4", "written by another config (training.learning_rate differ)")]


def test_replace_run_moves_the_old_run_aside(finished, tmp_path):
    out, values = _copy(finished, tmp_path)
    before = _files(out)
    values["training"].update(seed=8, max_steps=2)
    run_training(TrainConfig.from_dict({**values, "replace_run": True}))
    assert _files(tmp_path / "run.replaced-1") == before
    assert yaml.safe_load((out / "train_config.yaml").read_text())["training"]["seed"] == 8
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_run_failing_before_its_first_step_leaves_nothing(finished, tmp_path):
    values = train_setup(tmp_path, max_steps=2, save_steps=2)
    with pytest.raises(RuntimeError, match="injected fault"):
        run_training(TrainConfig.from_dict(values), callbacks=[Raise("on_step_begin")])
    assert not (tmp_path / "run").exists()
    # in a finished run's dir, replacing it: the old run is back, every file as it was
    out, values = _copy(finished, tmp_path / "second")
    before = _files(out)
    values["training"]["seed"] = 8
    with pytest.raises(RuntimeError, match="injected fault"):
        run_training(TrainConfig.from_dict({**values, "replace_run": True}), callbacks=[Raise("on_train_begin")])
    assert _files(out) == before and not (tmp_path / "second" / "run.replaced-1").exists()
