"""Mixtures: which datasets train together, under which task names, with which weights.

A mixture is YAML (a built-in name such as ``mix5``, a file path) or an inline mapping::

    name: mix5
    datasets:
      - {name: easyvqa, builtin: easyvqa, task: easyvqa, weight: 1.0}
      - {name: mine, path: /data/train.json, image_folder: /data/images, task: ocr, weight: 2.0,
         max_samples: 5000, splits: {val: /data/val.json, test: /data/test.json}}

``builtin`` names a dataset of ``asymlora data build``; ``path`` is a LLaVA JSON/JSONL or messages
file (the train split) or a directory holding ``{train,val,test}.json[l]``. ``task`` (default: the
entry's name) is the task the adapter routes by; the order of first appearance gives task ids.
``weight`` is the dataset's share of training draws (with the mixture sampler), ``max_samples`` caps
it (seeded shuffle, then cut).
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.data.reader import Sample, read_samples
from asymlora.errors import ConfigError
from asymlora.io import load_yaml

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "mixtures"
ENTRY_KEYS = ("name", "builtin", "path", "image_folder", "task", "weight", "max_samples", "splits", "on_error",
              "max_images_per_sample", "auto_insert_image_token")
SPLITS = ("train", "val", "test")


@dataclass
class MixtureEntry:
    name: str
    task: str
    weight: float = 1.0
    builtin: str | None = None
    path: str | None = None
    image_folder: str | None = None
    max_samples: int | None = None
    splits: dict[str, str] = field(default_factory=dict)
    on_error: str | None = None
    max_images_per_sample: int | None = None
    auto_insert_image_token: bool = False

    def split_file(self, split: str) -> tuple[Path | None, Path | None]:
        """(data file, image folder) for ``split``; (None, None) where the entry has no such split."""
        if self.builtin:
            from asymlora.datasets import dataset_dir

            root = dataset_dir(self.builtin)
            file = root / f"{split}.json"
            return (file if file.is_file() else None), root
        folder = Path(self.image_folder) if self.image_folder else None
        if split in self.splits:
            return Path(self.splits[split]), folder
        base = Path(self.path)
        if base.is_dir():
            for suffix in (".json", ".jsonl"):
                if (base / f"{split}{suffix}").is_file():
                    return base / f"{split}{suffix}", folder
            return None, None
        return (base, folder) if split == "train" else (None, None)


@dataclass
class Mixture:
    name: str
    entries: list[MixtureEntry]
    source: str = "mixture"

    @property
    def tasks(self) -> list[str]:
        """Task names in order of first appearance: index = task id."""
        seen: list[str] = []
        for entry in self.entries:
            if entry.task not in seen:
                seen.append(entry.task)
        return seen

    def load(self, split: str = "train", seed: int = 0, on_error: str = "fail") -> list[Sample]:
        """Every entry's samples of ``split`` (task set to the entry's task), max_samples applied."""
        samples: list[Sample] = []
        for entry in self.entries:
            file, folder = entry.split_file(split)
            if file is None:
                if split == "train":
                    raise ConfigError(f"{self.source}: dataset {entry.name!r} has no train data")
                continue
            rows = read_samples(file, image_folder=folder, on_error=entry.on_error or on_error, task=entry.task,
                                max_images_per_sample=entry.max_images_per_sample,
                                auto_insert_image_token=entry.auto_insert_image_token)
            if entry.max_samples is not None and len(rows) > entry.max_samples:
                order = list(range(len(rows)))
                random.Random(f"{seed}:{entry.name}:{split}").shuffle(order)
                rows = [rows[i] for i in sorted(order[: entry.max_samples])]
            for row in rows:
                row.dataset = entry.name
            samples.extend(rows)
        return samples

    def sampling_weights(self, samples: list[Sample]) -> list[float]:
        """Per-sample weights: each dataset's total probability is proportional to its weight."""
        counts: dict[str, int] = {}
        for sample in samples:
            counts[sample.dataset] = counts.get(sample.dataset, 0) + 1
        weight = {entry.name: entry.weight for entry in self.entries}
        return [weight.get(s.dataset, 1.0) / counts[s.dataset] for s in samples]


def _close(word: str, choices: Any) -> str:
    match = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _entry(values: Any, index: int, source: str, base: Path | None) -> MixtureEntry:
    where = f"{source}: datasets[{index}]"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping with name, builtin or path, task, weight")
    for key in values:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_close(key, ENTRY_KEYS)}")
    if ("builtin" in values) == ("path" in values):
        raise ConfigError(f"{where}: give exactly one of 'builtin' (a built-in dataset) or 'path' (a data file)")
    name = values.get("name") or values.get("builtin") or Path(str(values["path"])).stem
    weight = values.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise ConfigError(f"{where}.weight: must be a number > 0, got {weight!r}")
    max_samples = values.get("max_samples")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ConfigError(f"{where}.max_samples: must be an integer >= 1, got {max_samples!r}")
    if "builtin" in values:
        from asymlora.datasets import BUILDERS

        if values["builtin"] not in BUILDERS:
            raise ConfigError(f"{where}.builtin: {values['builtin']!r} is not one of {sorted(BUILDERS)}"
                              f"{_close(values['builtin'], BUILDERS)}")

    def resolve(p: Any) -> str:
        path = Path(str(p)).expanduser()
        return str(path if path.is_absolute() or base is None else base / path)

    splits = values.get("splits") or {}
    if not isinstance(splits, dict) or any(k not in SPLITS for k in splits):
        raise ConfigError(f"{where}.splits: expected a mapping of {SPLITS} to files, got {splits!r}")
    return MixtureEntry(
        name=str(name), task=str(values.get("task") or name), weight=float(weight), builtin=values.get("builtin"),
        path=resolve(values["path"]) if "path" in values else None,
        image_folder=resolve(values["image_folder"]) if values.get("image_folder") else None,
        max_samples=max_samples, splits={k: resolve(v) for k, v in splits.items()},
        on_error=values.get("on_error"), max_images_per_sample=values.get("max_images_per_sample"),
        auto_insert_image_token=bool(values.get("auto_insert_image_token", False)),
    )


def load_mixture(spec: str | Path | dict[str, Any]) -> Mixture:
    """A mixture from a built-in name (``mix5``), a YAML file or a mapping."""
    base: Path | None = None
    if isinstance(spec, dict):
        values, source = spec, "mixture"
    else:
        path = Path(spec)
        if not path.suffix and not path.exists():
            path = BUILTIN_DIR / f"{spec}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
                raise ConfigError(f"mixture: {spec!r} is neither a file nor a built-in mixture {known}"
                                  f"{_close(spec, known)}")
        if not path.is_file():
            raise ConfigError(f"mixture: {path} not found")
        values, source, base = load_yaml(path.read_text(encoding="utf-8")), str(path), path.parent
    if not isinstance(values, dict) or not isinstance(values.get("datasets"), list) or not values["datasets"]:
        raise ConfigError(f"{source}: a mixture needs 'datasets:', a non-empty list of entries")
    for key in values:
        if key not in ("name", "datasets"):
            raise ConfigError(f"{source}: unknown key {key!r}{_close(key, ('name', 'datasets'))}")
    entries = [_entry(v, i, source, base) for i, v in enumerate(values["datasets"])]
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: dataset names must be unique; repeated: {duplicates}")
    return Mixture(name=str(values.get("name", "mixture")), entries=entries, source=source)
