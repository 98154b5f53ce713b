"""Stage-1 alignment: train the projector alone on captions, so instruction tuning starts from a model
that uses the image (LLaVA's pre-training stage, on the built-in data).

``asymlora align`` (1) writes a caption dataset built deterministically from the labels of the
built-in datasets' train splits ("A red circle.", "A photo of a sneaker.", "The digit 7.", "An emoji
from the Flags category.", 'The word "owl".'), each with a brief-description prompt; (2) trains only the
projector of the default model (language model and vision tower frozen) with the same Trainer as
``asymlora train``; (3) writes the projector weights to ``src/asymlora/default_model/projector_default.safetensors``
with a JSON record of the command, seed, data, steps, loss and checksum. Training configs load it with
``model.projector: aligned``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from asymlora.assets import cache_dir
from asymlora.config import IMAGE_TOKEN
from asymlora.default_model import SHIPPED_PROJECTOR
from asymlora.errors import MissingAssetError
from asymlora.io import atomic_path, write_json_atomic
from asymlora.train import TrainConfig, run_training

PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What is in this picture?",
    "Summarize the visual content of the image.",
    "Write a terse description of the image.",
)
CAPTION_DATASETS = ("easyvqa", "fashion", "digits", "emoji", "ocr")


def _answer(record: dict[str, Any]) -> str:
    return record["conversations"][-1]["value"]


def _question(record: dict[str, Any]) -> str:
    return record["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip().lower()


EASYVQA_SHAPES = ("circle", "rectangle", "triangle")
EASYVQA_COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "black", "gray")
_NEGATION = re.compile(r"\b(not|no)\b")


def easyvqa_attributes(records: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """What each easy-VQA image is known to show, from every question about it: ``{"color": ..., "shape":
    ...}`` (either or both) per image path, for the images whose questions reveal anything.

    Open questions give the asked attribute, and the other attribute when the question names it
    ("what is the color of the circle?" -> red): colour and shape. A yes/no question tells that the
    named colour or shape is present when a positive question is answered yes or a negated one no;
    two shapes known absent leave the third.
    """
    known: dict[str, dict[str, str]] = defaultdict(dict)
    absent: dict[str, set[str]] = defaultdict(set)
    for record in records:
        question, answer = _question(record), _answer(record).lower()
        words = re.findall(r"[a-z]+", question)
        named = {"shape": [w for w in words if w in EASYVQA_SHAPES], "color": [w for w in words if w in EASYVQA_COLORS]}
        facts: dict[str, str] = {}
        if answer in ("yes", "no"):
            present = (answer == "yes") != bool(_NEGATION.search(question))
            if present:
                facts.update({kind: names[0] for kind, names in named.items() if len(names) == 1})
            elif len(named["shape"]) == 1 and not named["color"]:
                absent[record["image"]].add(named["shape"][0])
        else:
            kind = "shape" if answer in EASYVQA_SHAPES else "color" if answer in EASYVQA_COLORS else None
            if kind is None:
                continue
            facts[kind] = answer
            other = "color" if kind == "shape" else "shape"
            if len(named[other]) == 1:
                facts[other] = named[other][0]
        known[record["image"]].update(facts)
    for image, shapes in absent.items():
        left = [s for s in EASYVQA_SHAPES if s not in shapes]
        if len(left) == 1:
            known[image].setdefault("shape", left[0])
    return {image: facts for image, facts in sorted(known.items()) if facts}


def _easyvqa_captions(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One caption per easy-VQA image saying what :func:`easyvqa_attributes` knows of it: "A red circle.",
    "A circle.", or "A red shape."."""
    captions = []
    for image, facts in easyvqa_attributes(records).items():
        color, shape = facts.get("color"), facts.get("shape")
        if color and shape:
            captions.append((image, f"A {color} {shape}."))
        elif shape:
            captions.append((image, f"A {shape}."))
        elif color:
            captions.append((image, f"A {color} shape."))
    return captions


def captions_for(name: str, records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(image path relative to the dataset dir, caption) pairs from one built-in dataset's records."""
    if name == "easyvqa":
        return _easyvqa_captions(records)
    if name == "fashion":
        return [(r["image"], f"A photo of a {_answer(r)}.") for r in records]
    if name == "digits":
        return [(r["image"], f"The digit {_answer(r)}.") for r in records]
    if name == "emoji":
        return [(r["image"], f"An emoji from the {_answer(r)} category.") for r in records]
    if name == "ocr":
        return [(r["image"], f'The word "{_answer(r)}".') for r in records]
    raise ValueError(f"no captions defined for dataset {name!r}")


def build_caption_data(out_dir: Path | None = None, seed: int = 0, per_dataset: int = 2000) -> Path:
    """Write ``align.json`` (LLaVA format, absolute image paths) from the built-in train splits."""
    from asymlora.builtin_data import dataset_dir, load_split

    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for name in CAPTION_DATASETS:
        root = dataset_dir(name)
        pairs = captions_for(name, load_split(name, "train"))
        by_image = defaultdict(list)
        for image, caption in pairs:
            by_image[image].append(caption)
        chosen = sorted(by_image)
        rng.shuffle(chosen)
        for image in chosen[:per_dataset]:
            rows.append({
                "id": f"align-{name}-{len(rows):05d}",
                "image": str((root / image).resolve()),
                "conversations": [{"from": "human", "value": f"<image>\n{rng.choice(PROMPTS)}"},
                                  {"from": "gpt", "value": by_image[image][0]}],
                "task": "caption",
            })
    rng.shuffle(rows)
    out_dir = out_dir or cache_dir() / "data" / "align"
    path = out_dir / "align.json"
    write_json_atomic(path, rows, indent=1)
    return path


def alignment_config(data_path: Path, output_dir: Path, steps: int, batch_size: int, lr: float, seed: int,
                     model_path: str = "default", init: str | None = None) -> dict[str, Any]:
    return {
        "model": {"path": model_path, "projector": init},
        "data": {"mixture": {"name": "align", "datasets": [{"name": "align", "path": str(data_path),
                                                            "task": "caption"}]},
                 "eval_split": None, "max_length": 192, "group_by_length": False},
        "adapter": {"method": "lora", "target_modules": [], "modules_to_save": ["projector"]},
        "replace_run": True,  # an earlier alignment in output_dir is moved to <output_dir>.replaced-N
        "training": {"output_dir": str(output_dir), "max_steps": steps, "per_device_train_batch_size": batch_size,
                     "learning_rate": lr, "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.0,
                     "logging_steps": 10, "save_steps": max(min(steps // 2, 50), 1), "save_total_limit": 1,
                     "seed": seed,
                     "report_to": ["tensorboard"]},
    }


def run_align(steps: int = 300, batch_size: int = 8, lr: float = 1e-3, seed: int = 0, per_dataset: int = 2000,
              out: Path = SHIPPED_PROJECTOR, output_dir: Path | None = None, model_path: str = "default",
              init: str | None = None) -> Path:
    """Align the default model's projector and write it (plus its provenance record) to ``out``.

    ``init``: a projector safetensors to start from (default: the build's random projector)."""
    from safetensors.torch import load_file, save_file

    data_path = build_caption_data(seed=seed, per_dataset=per_dataset)
    output_dir = output_dir or Path("runs") / "align"
    init_sha256 = hashlib.sha256(Path(init).read_bytes()).hexdigest() if init else None
    config = TrainConfig.from_dict(alignment_config(data_path, output_dir, steps, batch_size, lr, seed, model_path,
                                                    init), source="asymlora align")
    start = time.time()
    run_dir = run_training(config)
    seconds = time.time() - start
    tensors = load_file(str(run_dir / "adapter_model.safetensors"))
    prefix = "model.multi_modal_projector."
    projector = {"multi_modal_projector." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not projector:
        raise MissingAssetError(f"{run_dir}: the trained adapter holds no projector tensors")
    with atomic_path(out) as tmp:
        save_file(projector, str(tmp), metadata={"format": "pt"})
    state = json.loads((run_dir / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    record = {
        "command": "asymlora align " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["align"]
        else f"asymlora align --steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed}"
        + (f" --init {shlex.quote(str(init))}" if init else ""),
        "seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": lr,
        "init": {"path": str(init), "sha256": init_sha256} if init else None,
        "data": {"datasets": list(CAPTION_DATASETS), "per_dataset": per_dataset, "split": "train",
                 "prompts": list(PROMPTS), "samples": len(json.loads(Path(data_path).read_text()))},
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "train_seconds": round(seconds, 1),
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    write_json_atomic(out.with_suffix(".json"), record)
    print(f"aligned projector written to {out} (loss {record['loss_first']} -> {record['loss_last']})")
    return out
