"""Fashion-MNIST: "What item of clothing is this?" answered with one of the ten class names.

Source: Debian ``dataset-fashion-mnist`` (MIT/Expat, Zalando SE), the IDX files
``usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (60,000 train and
10,000 test 28x28 greyscale images). Validation images are a fixed seeded set of
:data:`VAL_POOL` train images that never go to train; test comes from the t10k file. Images are
upscaled to :data:`IMAGE_SIZE` px (bicubic) when saved.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from asymlora.builtin_data.common import BuildContext, DatasetBuilder, Sample
from asymlora.errors import DataError

QUESTION = "What item of clothing is this?"
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
IMAGE_SIZE = 112
VAL_POOL = 5000  # train images reserved for validation


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (unsigned bytes) into an array of its declared shape."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path}: {array.size} values for declared shape {shape}")
    return array.reshape(shape)


def load_part(directory: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of ``part`` ("train" or "t10k")."""
    images = read_idx(directory / f"{part}-images-idx3-ubyte.gz")
    labels = read_idx(directory / f"{part}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{directory}: {images.shape[0]} {part} images but {labels.shape[0]} labels")
    return images, labels


def _samples(
    context: BuildContext, split: str, indices: np.ndarray, images: np.ndarray, labels: np.ndarray, part: str
) -> list[Sample]:
    samples = []
    for index in indices[: context.size(split, len(indices))]:
        picture = Image.fromarray(images[index]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        path = context.save_image(split, f"{part}-{int(index):05d}", picture)
        samples.append(Sample(path, QUESTION, CLASS_NAMES[int(labels[index])]))
    return samples


def make(context: BuildContext, assets: Mapping[str, Path]) -> dict[str, list[Sample]]:
    """Train and val from disjoint parts of a seeded permutation of the 60k train images; test from t10k."""
    directory = assets["fashion"].parent
    train_images, train_labels = load_part(directory, "train")
    test_images, test_labels = load_part(directory, "t10k")
    order = context.rng("train-order").permutation(len(train_images))
    return {
        "train": _samples(context, "train", order[VAL_POOL:], train_images, train_labels, "train"),
        "val": _samples(context, "val", order[:VAL_POOL], train_images, train_labels, "train"),
        "test": _samples(
            context,
            "test",
            context.rng("test-order").permutation(len(test_images)),
            test_images,
            test_labels,
            "t10k",
        ),
    }


BUILDER = DatasetBuilder(
    name="fashion",
    description="Fashion-MNIST: name the item of clothing (10 classes)",
    source="Debian dataset-fashion-mnist",
    licence="MIT (Expat), Zalando SE",
    assets=("fashion",),
    default_sizes={"train": 4000, "val": 500, "test": 500},
    make=make,
)
