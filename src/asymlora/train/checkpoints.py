"""Checkpoints of a run: which ``checkpoint-N`` dirs are complete, finite and of the run's config.

A ``checkpoint-N`` dir counts only when every file a resume reads is complete: ``trainer_state.json`` parses
as JSON with a ``global_step`` (the Trainer writes it last, and not atomically: a kill while it is written
leaves it empty or cut), ``adapter_config.json`` parses, ``adapter_model.safetensors`` opens and holds every
tensor ``adapter_config.json`` names, all of them finite, and the optimizer, scheduler and RNG files are
there as the Trainer writes them. ``train_config.yaml`` in a checkpoint records the config that wrote it; a
checkpoint of another config does not count for this one (:func:`config_differences`).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
RUN_CONFIG_NAME = "train_config.yaml"
TRAINER_STATE_NAME = "trainer_state.json"
# Keys that say how a run is checkpointed, logged or started, not what it computes: runs differing only
# in them are one run (top-level keys, and training.* keys by name or by prefix).
IGNORED_TOP_LEVEL = ("resume", "replace_run")
IGNORED_TRAINING = ("output_dir", "report_to", "disable_tqdm", "run_name", "save_steps", "save_strategy",
                    "save_total_limit", "save_only_model", "save_safetensors", "save_on_each_node")
IGNORED_TRAINING_PREFIXES = ("logging_",)


def checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-N`` dirs of ``output_dir``, the highest N first ([] when there is no such dir)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m[1]), p) for p in out.iterdir() if (m := CHECKPOINT_PATTERN.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def last_checkpoint(output_dir: str | os.PathLike[str], config: dict[str, Any] | None = None,
                    optimizer: bool = True, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The highest ``checkpoint-N`` of ``output_dir`` that a run of ``config`` can resume from (see the module
    docstring; ``config`` None: any config; ``optimizer`` False: the optimizer, scheduler and RNG files are
    not required, as under ``save_only_model``), or None. Each higher one passed over is appended to
    ``skipped`` with the reason."""
    for path in checkpoints(output_dir):
        problem = checkpoint_problem(path, config, optimizer)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append((path, problem))
    return None


def checkpoint_problem(path: str | os.PathLike[str], config: dict[str, Any] | None = None,
                       optimizer: bool = True) -> str | None:
    """Why the checkpoint dir ``path`` cannot be resumed from by a run of ``config``, or None when it can."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    state = path / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME} (cut off while being written)"
    try:
        document = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{TRAINER_STATE_NAME} is not valid JSON ({state.stat().st_size} bytes: cut off while being written)"
    if not isinstance(document, dict) or not isinstance(document.get("global_step"), int):
        return f"{TRAINER_STATE_NAME} holds no global_step"
    problem = _adapter_problem(path)
    if problem is None and optimizer:
        problem = _optimizer_problem(path)
    if problem is None and config is not None:
        recorded = read_run_config(path)
        differences = [] if recorded is None else config_differences(recorded, config)
        if differences:
            problem = f"written by another config ({', '.join(differences)} differ)"
    return problem


def _adapter_problem(path: Path) -> str | None:
    """Why the adapter files of a checkpoint are incomplete, do not parse or hold a non-finite tensor."""
    from safetensors import safe_open

    from asymlora.persistence import CONFIG_NAME, WEIGHTS_NAME

    try:
        manifest = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {CONFIG_NAME}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{CONFIG_NAME} is not valid JSON"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict):
        return f"{CONFIG_NAME} holds no layer manifest"
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return f"no {WEIGHTS_NAME}"
    try:
        with safe_open(str(weights), framework="pt") as file:
            names = set(file.keys())
            missing = [name for name in expected_tensors(manifest) if name not in names]
            if missing:
                return f"{WEIGHTS_NAME} lacks {len(missing)} tensor(s) {CONFIG_NAME} names (e.g. {missing[0]})"
            for name in sorted(names):
                if not file.get_tensor(name).isfinite().all():
                    return f"{WEIGHTS_NAME}: tensor {name} holds NaN or inf"
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        return f"{WEIGHTS_NAME} does not open ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


def expected_tensors(manifest: dict[str, Any]) -> list[str]:
    """The tensor names an ``adapter_config.json`` implies: each adapted layer's A and B banks, its router and
    task bias where its spec has them, and a tensor of each saved module (as ``<module>.`` prefix)."""
    from asymlora.config import LayerSpec

    fields = set(LayerSpec.__dataclass_fields__)
    names: list[str] = []
    for layer, entry in manifest["layers"].items():
        names += [f"{layer}.A_bank", f"{layer}.B_bank"]
        try:
            spec = LayerSpec(**{k: v for k, v in entry.items() if k in fields})
        except TypeError:  # a manifest of another version: the banks are what every version saves
            continue
        if spec.has_router:
            names += [f"{layer}.router.weight", f"{layer}.router.bias"]
        if spec.has_task_bias:
            names.append(f"{layer}.task_bias")
    return names


def _optimizer_problem(path: Path) -> str | None:
    """Why the Trainer's optimizer, scheduler or RNG state in a checkpoint is missing or cut (``torch.save``
    writes zip archives, whose directory is at the end: a cut file is not a valid zip)."""
    if (path / "latest").is_file():  # DeepSpeed: its own checkpoint holds the optimizer
        required: Iterable[str] = ("scheduler.pt",)
    else:
        required = ("optimizer.pt", "scheduler.pt")
    for name in required:
        if not (path / name).is_file():
            return f"no {name}"
        if not zipfile.is_zipfile(path / name):
            return f"{name} is cut off ({(path / name).stat().st_size} bytes)"
    rng = sorted(path.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state.pth"
    for file in rng:
        if not zipfile.is_zipfile(file):
            return f"{file.name} is cut off ({file.stat().st_size} bytes)"
    return None


def read_run_config(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The config recorded in ``directory``'s ``train_config.yaml``, None when there is none; a file that does
    not parse as a mapping reads as an empty config (it differs from every real one)."""
    from asymlora.io import load_yaml

    path = Path(directory) / RUN_CONFIG_NAME
    try:
        values = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return values if isinstance(values, dict) else {}


def run_config_text(config: dict[str, Any]) -> str:
    """What ``train_config.yaml`` holds for a config mapping (``TrainConfig.to_dict()``)."""
    return yaml.safe_dump(config, sort_keys=False)


def config_differences(recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The dotted keys (``training.learning_rate``) whose values differ between two config mappings, leaving
    out the keys that do not change what a run computes (checkpoint cadence, logging, resume)."""
    from asymlora.io import load_yaml

    current = load_yaml(run_config_text(config))  # as the file would hold it: lists, floats as YAML reads them
    flat_recorded, flat_current = _flatten(recorded), _flatten(current)
    keys = sorted(set(flat_recorded) | set(flat_current))
    return [key for key in keys if not _ignored(key) and flat_recorded.get(key) != flat_current.get(key)]


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """Top-level sections one level deep (``training.seed``); deeper values compared whole. None values are
    left out, so a key set to null and a key absent compare equal."""
    flat: dict[str, Any] = {}
    for key, value in (values or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            flat.update(_flatten(value, name + "."))
        elif value is not None:
            flat[name] = value
    return flat


def _ignored(key: str) -> bool:
    section, _, name = key.partition(".")
    if not name:
        return section in IGNORED_TOP_LEVEL
    return section == "training" and (name in IGNORED_TRAINING or name.startswith(IGNORED_TRAINING_PREFIXES))
