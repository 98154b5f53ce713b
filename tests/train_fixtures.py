"""A tiny two-task image dataset in LLaVA JSON and a saved tiny random LLaVA, for training tests."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image

from asymlora.tiny import build_tiny

COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}


def write_dataset(root: Path, n: int = 24, seed: int = 0, long_colors: bool = False) -> dict:
    """Two tasks on the same kind of images: name the colour, or say whether it is red (with
    ``long_colors``, the colour answers are a whole sentence: the tasks' answer lengths differ)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    color, bright = [], []
    for i in range(n):
        name = rng.choice(sorted(COLORS))
        path = root / "images" / f"{i}.png"
        Image.new("RGB", (28, 28), COLORS[name]).save(path)
        color.append({"id": f"c{i}", "image": f"images/{i}.png", "task": "color", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is this?"},
            {"from": "gpt", "value": f"this square is filled with a bright {name} colour, all over" if long_colors
             else name}]})
        bright.append({"id": f"r{i}", "image": f"images/{i}.png", "task": "isred", "conversations": [
            {"from": "human", "value": "<image>\nis it red? answer yes or no."},
            {"from": "gpt", "value": "yes" if name == "red" else "no"}]})
    for name, rows in (("color", color), ("isred", bright)):
        (root / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return {"name": "tiny2", "datasets": [
        {"name": "color", "path": str(root / "color.json"), "task": "color", "weight": 1.0},
        {"name": "isred", "path": str(root / "isred.json"), "task": "isred", "weight": 1.0},
    ]}


def train_setup(tmp: Path, method: str = "asymlora_moe", long_colors: bool = False, **training) -> dict:
    """A complete train config (dict) over the tiny model and dataset under ``tmp``."""
    model_dir = tmp / "model"
    if not model_dir.exists():
        build_tiny(model_dir)
    mixture = write_dataset(tmp / "data", long_colors=long_colors)
    adapter = {"method": method, "r": 4, "alpha": 8, "modules_to_save": ["projector"]}
    if method in ("asymlora_moe", "lora_moe"):
        adapter.update(num_experts=2, balance_loss_weight=0.01)
    args = {"output_dir": str(tmp / "run"), "max_steps": 12, "per_device_train_batch_size": 4,
            "learning_rate": 5e-3, "logging_steps": 4, "save_steps": 6, "report_to": [], "use_cpu": True,
            "seed": 7, "disable_tqdm": True, "warmup_steps": 0, "lr_scheduler_type": "constant"}
    args.update(training)
    return {"model": {"path": str(model_dir)}, "data": {"mixture": mixture, "eval_split": None, "max_length": 128},
            "adapter": adapter, "training": args, "projector_lr": 1e-3}


def log_history(run: Path) -> list[dict]:
    """The Trainer's log entries of a finished run."""
    return json.loads((run / "trainer_state.json").read_text())["log_history"]


def losses(run: Path) -> list[float]:
    """The training loss of every logging step of a finished run."""
    return [entry["loss"] for entry in log_history(run) if "loss" in entry]


def launch_two_processes(config_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The README's command, on CPU: accelerate launch --multi_gpu --num_processes 2 -m asymlora.cli train."""
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "asymlora.cli", "train",
         str(config_path), *args],
        capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def peer_format_mixture(root: Path, fmt: str) -> dict:
    """The dataset of :func:`write_dataset`, rewritten in a peer tool's format, and the mixture that reads it.

    ``swift``: ms-swift's messages records (string content with ``<image>``, ``images: [{"path": ...}]``);
    ``registry``: LLaMA-Factory's ``dataset_info.json`` with both tasks as mllm_demo-style sharegpt datasets;
    ``from_record``: both tasks in one file, each record naming its task, read with ``task: from_record``.
    """
    write_dataset(root)
    rows = {name: json.loads((root / f"{name}.json").read_text()) for name in ("color", "isred")}

    def messages(row: dict) -> list[dict]:
        role = {"human": "user", "gpt": "assistant"}
        return [{"role": role[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]

    if fmt == "swift":
        for name, records in rows.items():
            lines = [json.dumps({"messages": messages(r), "images": [{"path": r["image"]}]}) for r in records]
            (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        return {"name": "swift", "datasets": [
            {"name": name, "path": str(root / f"{name}.jsonl"), "task": name} for name in rows]}
    if fmt == "registry":
        registry = {}
        for name, records in rows.items():
            (root / f"{name}_lf.json").write_text(json.dumps(
                [{"messages": messages(r), "images": [r["image"]]} for r in records], indent=2))
            registry[name] = {"file_name": f"{name}_lf.json", "formatting": "sharegpt",
                              "columns": {"messages": "messages", "images": "images"},
                              "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                       "assistant_tag": "assistant"}}
        (root / "dataset_info.json").write_text(json.dumps(registry, indent=2))
        return {"name": "registry", "datasets": [
            {"registry": str(root / "dataset_info.json"), "name": name} for name in rows]}
    if fmt == "from_record":
        mixed = [row for pair in zip(rows["color"], rows["isred"]) for row in pair]  # tasks: color first
        (root / "mixed.json").write_text(json.dumps(mixed, indent=1))
        return {"name": "from_record", "datasets": [
            {"name": "mixed", "path": str(root / "mixed.json"), "task": "from_record"}]}
    raise ValueError(f"unknown format {fmt!r}")
