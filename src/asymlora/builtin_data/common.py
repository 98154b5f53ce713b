"""The machinery shared by every built-in dataset: records, splits, image writing, stats, atomic swap.

A builder (:class:`DatasetBuilder`) only turns its source into three lists of (image, question, answer)
through a :class:`BuildContext`. This module does the rest, the same way for every dataset:

* sizes: each builder has default sizes per split; ``max_per_split`` caps them. A builder fixes which
  source items may go to which split *before* looking at the sizes, and every split draws from its own
  random stream, so a smaller build is a prefix of a larger one and val/test do not move when the
  train size changes.
* layout: ``<root>/<name>/{train,val,test}.json`` (LLaVA format), ``images/<split>/*.png`` and
  ``stats.json``; ``image`` in a record is relative to ``<root>/<name>``.
* atomicity: everything is written into a hidden staging directory next to the target, which is then
  renamed onto ``<root>/<name>``; a crash leaves the previous complete build (or nothing) in place.
* idempotency: ``stats.json`` holds the build key (format version, seed, sizes); a build whose key
  matches the one on disk is skipped unless ``force``.
* stats: counts, answer distribution and the majority-answer baseline (the accuracy on the test split of
  always answering the most frequent train answer).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from asymlora.assets import cache_dir, require
from asymlora.config import IMAGE_TOKEN
from asymlora.errors import DataError, MissingAssetError
from asymlora.io import read_json, write_json_atomic

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Bump when the output of any builder changes for the same seed and sizes: old builds are then rebuilt.
FORMAT_VERSION = 3
TOP_ANSWERS = 10
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[0-9a-f]+$")


def data_root() -> Path:
    """Where built datasets live by default: ``cache_dir()/data``."""
    return cache_dir() / "data"


def dataset_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The directory of dataset ``name`` under ``root`` (default :func:`data_root`)."""
    return (Path(root) if root is not None else data_root()) / name


def seeded_rng(seed: int, *stream: str) -> np.random.Generator:
    """A generator for one named random stream, independent of every other stream of the same seed."""
    return np.random.default_rng([seed, *(zlib.crc32(part.encode("utf-8")) for part in stream)])


@dataclass
class Sample:
    """One question about one image, before it becomes a LLaVA record."""

    image: str  # path relative to the dataset directory
    question: str
    answer: str


def make_record(name: str, split: str, index: int, sample: Sample) -> dict[str, Any]:
    """The LLaVA-format record of ``sample``; ``task`` is the dataset name."""
    return {
        "id": f"{name}-{split}-{index:05d}",
        "image": sample.image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ],
        "task": name,
    }


def validate_records(records: Sequence[Mapping[str, Any]], where: str, root: Path | None = None) -> None:
    """Raise :class:`DataError` naming the record if ``records`` is not a list of well-formed LLaVA records.

    With ``root`` given, also check that every image file exists under it.
    """
    seen: set[str] = set()
    for i, record in enumerate(records):
        label = f"{where}: record {i}"
        if set(record) != {"id", "image", "conversations", "task"}:
            raise DataError(f"{label} has keys {sorted(record)}, expected id, image, conversations, task")
        if not isinstance(record["id"], str) or record["id"] in seen:
            raise DataError(f"{label}: id {record['id']!r} is not a unique string")
        seen.add(record["id"])
        turns = record["conversations"]
        if (
            not isinstance(turns, list)
            or len(turns) != 2
            or [t.get("from") for t in turns] != ["human", "gpt"]
            or not all(isinstance(t.get("value"), str) and t["value"] for t in turns)
        ):
            raise DataError(f"{label}: conversations must be one human turn then one non-empty gpt turn")
        if not turns[0]["value"].startswith(f"{IMAGE_TOKEN}\n") or turns[0]["value"].count(IMAGE_TOKEN) != 1:
            raise DataError(f"{label}: the human turn must start with exactly one '<image>\\n'")
        image = record["image"]
        if not isinstance(image, str) or Path(image).is_absolute() or ".." in Path(image).parts:
            raise DataError(f"{label}: image {image!r} must be a path relative to the dataset directory")
        if root is not None and not (root / image).is_file():
            raise DataError(f"{label}: image file {root / image} does not exist")


def question_of(record: Mapping[str, Any]) -> str:
    """The question text of a record (the human turn without the image placeholder)."""
    return record["conversations"][0]["value"].removeprefix("<image>\n")


def answer_of(record: Mapping[str, Any]) -> str:
    """The reference answer of a record (the gpt turn)."""
    return record["conversations"][1]["value"]


def majority_baseline(
    train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]]
) -> tuple[str, float]:
    """The most frequent train answer and the exact-match accuracy of always giving it on ``test``.

    Ties are broken by the answer text, so the result does not depend on the order of the records.
    """
    counts = Counter(answer_of(r) for r in train)
    if not counts:
        raise DataError("the train split is empty: no majority answer")
    answer = min(counts, key=lambda a: (-counts[a], a))
    accuracy = sum(answer_of(r) == answer for r in test) / len(test) if test else 0.0
    return answer, accuracy


def question_majority_baseline(
    train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]]
) -> float:
    """Accuracy on ``test`` of answering each question with its most frequent train answer.

    A question not seen in train gets the overall majority answer. This is the strongest baseline that
    ignores the image.
    """
    overall, _ = majority_baseline(train, test)
    by_question: dict[str, Counter[str]] = {}
    for r in train:
        by_question.setdefault(question_of(r), Counter())[answer_of(r)] += 1
    best = {q: min(c, key=lambda a: (-c[a], a)) for q, c in by_question.items()}
    hits = sum(answer_of(r) == best.get(question_of(r), overall) for r in test)
    return hits / len(test) if test else 0.0


def compute_stats(name: str, splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Counts per split, top answers per split and the majority baselines (see module docstring)."""
    stats: dict[str, Any] = {"counts": {s: len(splits[s]) for s in SPLITS}}
    stats["images"] = {s: len({r["image"] for r in splits[s]}) for s in SPLITS}
    stats["distinct_questions"] = {s: len({question_of(r) for r in splits[s]}) for s in SPLITS}
    stats["distinct_answers"] = {s: len({answer_of(r) for r in splits[s]}) for s in SPLITS}
    top: dict[str, list[dict[str, Any]]] = {}
    for s in SPLITS:
        counts = Counter(answer_of(r) for r in splits[s])
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ANSWERS]
        top[s] = [{"answer": a, "count": c, "fraction": round(c / len(splits[s]), 4)} for a, c in ranked]
    stats["top_answers"] = top
    answer, accuracy = majority_baseline(splits["train"], splits["test"])
    stats["majority_answer"] = answer
    stats["majority_baseline"] = round(accuracy, 4)
    stats["question_majority_baseline"] = round(
        question_majority_baseline(splits["train"], splits["test"]), 4
    )
    return stats


class BuildContext:
    """What a builder gets: the seed, the sizes to produce, random streams and an image writer."""

    def __init__(self, name: str, seed: int, sizes: Mapping[str, int | None], directory: Path):
        self.name = name
        self.seed = seed
        self.sizes = dict(sizes)
        self.directory = directory
        self._written: set[str] = set()

    def rng(self, *stream: str) -> np.random.Generator:
        """The random stream ``stream`` of this dataset and seed (see :func:`seeded_rng`)."""
        return seeded_rng(self.seed, self.name, *stream)

    def size(self, split: str, available: int | None = None) -> int:
        """How many samples to make for ``split`` when the source allows at most ``available``.

        ``available=None`` is for generated data (no limit): the split must then have a size.
        """
        wanted = self.sizes[split]
        if wanted is None:
            if available is None:
                raise DataError(
                    f"dataset {self.name!r}: split {split!r} needs a size (its data is generated)"
                )
            return available
        return wanted if available is None else min(wanted, available)

    def image_path(self, split: str, stem: str) -> str:
        """The relative path of image ``stem`` of ``split``: ``images/<split>/<stem>.png``."""
        return f"images/{split}/{stem}.png"

    def has_image(self, relative: str) -> bool:
        """Whether ``relative`` was already written in this build (images shared by several questions)."""
        return relative in self._written

    def save_image(self, split: str, stem: str, image: Image.Image) -> str:
        """Write ``image`` as an RGB PNG and return its relative path. Same pixels give the same bytes."""
        relative = self.image_path(split, stem)
        if relative not in self._written:
            path = self.directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            image.convert("RGB").save(path, format="PNG", compress_level=6)
            self._written.add(relative)
        return relative

    def copy_image(self, split: str, stem: str, source: Path) -> str:
        """Copy an existing PNG file byte for byte and return its relative path."""
        relative = self.image_path(split, stem)
        if relative not in self._written:
            path = self.directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
            self._written.add(relative)
        return relative


@dataclass(frozen=True)
class DatasetBuilder:
    """One built-in dataset.

    ``make`` receives the :class:`BuildContext` and, by asset name, the path of each required asset's
    member file (``asymlora.assets.require``), and returns the samples of each split, in order.
    """

    name: str
    description: str
    source: str
    licence: str
    assets: tuple[str, ...]
    default_sizes: Mapping[str, int | None]
    make: Callable[[BuildContext, Mapping[str, Path]], Mapping[str, list[Sample]]] = field(repr=False)

    def sizes(self, max_per_split: int | None = None) -> dict[str, int | None]:
        """The size of each split, capped by ``max_per_split`` (None = everything the source offers)."""
        if max_per_split is not None and max_per_split < 1:
            raise DataError(f"max_per_split must be a positive integer, got {max_per_split}")
        sizes: dict[str, int | None] = {}
        for split in SPLITS:
            size = self.default_sizes[split]
            if max_per_split is not None:
                size = max_per_split if size is None else min(size, max_per_split)
            sizes[split] = size
        return sizes


@dataclass
class BuildResult:
    """The outcome of one build: where it is, its stats, whether it was skipped, how long it took."""

    name: str
    directory: Path
    stats: dict[str, Any]
    skipped: bool
    seconds: float


def build_key(builder: DatasetBuilder, seed: int, max_per_split: int | None) -> dict[str, Any]:
    """What identifies a build's output: same key, same bytes."""
    return {
        "format": FORMAT_VERSION,
        "name": builder.name,
        "seed": seed,
        "sizes": builder.sizes(max_per_split),
    }


def read_stats(directory: Path) -> dict[str, Any] | None:
    """The ``stats.json`` of a built dataset, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((directory / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(root: Path, name: str) -> None:
    """Remove staging directories of ``name`` left by builds whose process has died."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        match = _STAGING.match(entry.name)
        if match and match["name"] == name and entry.is_dir() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete ``staging`` directory at ``target`` with renames only."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_build(
    builder: DatasetBuilder,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    max_per_split: int | None = None,
    force: bool = False,
) -> BuildResult:
    """Build ``builder`` into ``<root>/<name>`` (see the module docstring) and return what happened."""
    start = time.perf_counter()
    target = dataset_dir(builder.name, root)
    key = build_key(builder, seed, max_per_split)
    existing = read_stats(target)
    if not force and existing is not None and existing.get("build") == key:
        return BuildResult(builder.name, target, existing, True, time.perf_counter() - start)

    assets = {name: require(name) for name in builder.assets}
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target.parent, builder.name)
    staging = target.with_name(f".{builder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        context = BuildContext(builder.name, seed, key["sizes"], staging)
        samples = builder.make(context, assets)
        splits = {s: [make_record(builder.name, s, i, x) for i, x in enumerate(samples[s])] for s in SPLITS}
        for split, records in splits.items():
            validate_records(records, f"{builder.name}/{split}", root=staging)
            if not records:
                raise DataError(f"dataset {builder.name!r}: split {split!r} came out empty")
            write_json_atomic(staging / f"{split}.json", records, indent=1)
        stats = {
            "name": builder.name,
            "task": builder.name,
            "build": key,
            **compute_stats(builder.name, splits),
        }
        write_json_atomic(staging / "stats.json", stats)
        # write_json_atomic's temporary files are private (0600); give the JSON files the mode that
        # new files get under the current umask, like the images.
        file_mode = staging.stat().st_mode & 0o666
        for path in staging.glob("*.json"):
            path.chmod(file_mode)
        _swap_in(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(builder.name, target, stats, False, time.perf_counter() - start)


def load_records(name: str, split: str, root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The records of one split of a built dataset; MissingAssetError with the build command if absent."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = dataset_dir(name, root) / f"{split}.json"
    if not path.is_file():
        raise MissingAssetError(
            f"dataset {name!r} is not built ({path} is missing). Run: asymlora data build --only {name}"
        )
    records = read_json(path, f"the {split} records of dataset {name!r}")
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return records
