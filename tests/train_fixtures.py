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
