"""A tiny two-task image dataset in LLaVA JSON and a saved tiny random LLaVA, for training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from asymlora.tiny import build_tiny

COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}


def write_dataset(root: Path, n: int = 24, seed: int = 0) -> dict:
    """Two tasks on the same kind of images: name the colour, or say whether it is red."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    color, bright = [], []
    for i in range(n):
        name = rng.choice(sorted(COLORS))
        path = root / "images" / f"{i}.png"
        Image.new("RGB", (28, 28), COLORS[name]).save(path)
        color.append({"id": f"c{i}", "image": f"images/{i}.png", "task": "color", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is this?"}, {"from": "gpt", "value": name}]})
        bright.append({"id": f"r{i}", "image": f"images/{i}.png", "task": "isred", "conversations": [
            {"from": "human", "value": "<image>\nis it red? answer yes or no."},
            {"from": "gpt", "value": "yes" if name == "red" else "no"}]})
    for name, rows in (("color", color), ("isred", bright)):
        (root / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return {"name": "tiny2", "datasets": [
        {"name": "color", "path": str(root / "color.json"), "task": "color", "weight": 1.0},
        {"name": "isred", "path": str(root / "isred.json"), "task": "isred", "weight": 1.0},
    ]}


def train_setup(tmp: Path, method: str = "asymlora_moe", **training) -> dict:
    """A complete train config (dict) over the tiny model and dataset under ``tmp``."""
    model_dir = tmp / "model"
    if not model_dir.exists():
        build_tiny(model_dir)
    mixture = write_dataset(tmp / "data")
    adapter = {"method": method, "r": 4, "alpha": 8, "modules_to_save": ["projector"]}
    if method in ("asymlora_moe", "lora_moe"):
        adapter.update(num_experts=2, balance_loss_weight=0.01)
    args = {"output_dir": str(tmp / "run"), "max_steps": 12, "per_device_train_batch_size": 4,
            "learning_rate": 5e-3, "logging_steps": 4, "save_steps": 6, "report_to": [], "use_cpu": True,
            "seed": 7, "disable_tqdm": True, "warmup_steps": 0, "lr_scheduler_type": "constant"}
    args.update(training)
    return {"model": {"path": str(model_dir)}, "data": {"mixture": mixture, "eval_split": None, "max_length": 128},
            "adapter": adapter, "training": args, "projector_lr": 1e-3}
