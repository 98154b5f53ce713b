"""Mixtures: which datasets train together, under which task names, with which weights.

A mixture is YAML (a built-in name such as ``mix5``, looked up in ``asymlora/mixtures/<name>.yaml``;
or a file path) or the same content as a mapping::

    name: mix5
    datasets:
      - {name: easyvqa, builtin: easyvqa, task: easyvqa, weight: 1.0}
      - {name: mine, path: /data/train.json, image_folder: /data/images, task: ocr, weight: 2.0,
         max_samples: 5000, splits: {val: /data/val.json, test: /data/test.json}}

Each entry gives exactly one of ``builtin`` (a dataset of ``asymlora data build``), ``path`` (a
LLaVA JSON/JSONL or messages file -- the train split -- or a directory holding
``{train,val,test}.json[l]``) and ``registry`` (LLaMA-Factory's ``dataset_info.json``: the entry's
``name`` is the dataset it describes). Relative paths in a YAML file resolve against the file's directory.
``task`` (default: the entry's ``name``) is what the adapter routes by; ``task: from_record`` takes each
record's own ``task`` instead. The order of first appearance gives the task ids (:attr:`Mixture.tasks`).
Several entries may share a task only if each of them says so with an explicit ``task:`` (or in its
records, under ``from_record``). ``weight`` (> 0) is the dataset's share of training draws, see
:meth:`Mixture.sampling_weights`; ``max_samples`` caps its size (seeded shuffle, then cut).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.data.reader import (
    FROM_RECORD,
    ON_ERROR,
    Sample,
    iter_records,
    read_samples_with_report,
)
from asymlora.data.registry import RecordFormat
from asymlora.errors import ConfigError, DataError, MissingAssetError, did_you_mean
from asymlora.io import read_yaml

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "mixtures"
MIXTURE_KEYS = ("name", "datasets")
ENTRY_KEYS = ("name", "builtin", "path", "registry", "image_folder", "task", "weight", "max_samples", "splits", "on_error",
              "max_images_per_sample", "auto_insert_image_token")
PATH_ONLY_KEYS = ("image_folder", "splits")
SOURCE_KEYS = ("builtin", "path", "registry")
# dataset_info.json keys of datasets that are not local files, or not supervised conversations
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "script_url", "om_hub_url", "cloud_file_name")
SPLITS = ("train", "val", "test")


@dataclass
class MixtureEntry:
    """One dataset of a mixture, validated; paths are absolute (or relative to the working directory)."""

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
    explicit_task: bool = True
    registry: str | None = None
    record_format: RecordFormat | None = None
    _record_tasks: list[str] | None = field(default=None, repr=False, compare=False)

    @property
    def from_record(self) -> bool:
        """Whether each sample's task is its record's own ``task`` (``task: from_record``)."""
        return self.task == FROM_RECORD

    def record_tasks(self, on_error: str = "fail") -> list[str]:
        """The tasks named by the records of the train split, in order of first appearance.

        A record without a task name raises DataError with its ``file:line`` (unless the entry's
        ``on_error``, else ``on_error``, is ``skip``: the reader then drops it as it loads).
        """
        if self._record_tasks is None:
            file, _ = self.split_file("train")
            if file is None:
                raise ConfigError(f"dataset {self.name!r} has no train data")
            if not file.is_file():
                raise DataError(f"{file}: data file not found")
            tasks: dict[str, None] = {}
            for line, record in iter_records(file):
                if not isinstance(record, dict):
                    continue  # the reader reports it
                task = record.get("task")
                if isinstance(task, str) and task:
                    tasks[task] = None
                elif (self.on_error or on_error) != "skip":
                    got = "missing" if task is None else f"expected a non-empty string, got {task!r}"
                    raise DataError(f"{file}:{line}: task: {got} (dataset {self.name!r} has task: from_record, "
                                    "so every record names its task)")
            self._record_tasks = list(tasks)
        return list(self._record_tasks)

    def split_file(self, split: str) -> tuple[Path | None, Path | None]:
        """(data file, image folder) of ``split``; (None, None) where the entry has no such split.

        A built-in dataset that is not built raises MissingAssetError with the command that builds it.
        """
        if self.builtin:
            from asymlora.builtin_data import dataset_dir  # lazy: the datasets package is optional here

            root = dataset_dir(self.builtin)
            if not root.is_dir():
                raise MissingAssetError(f"dataset {self.builtin!r} is not built ({root} is missing). "
                                        f"Run: asymlora data build --only {self.builtin}")
            file = root / f"{split}.json"
            return (file if file.is_file() else None), root
        folder = Path(self.image_folder) if self.image_folder else None
        if split in self.splits:
            return Path(self.splits[split]), folder
        base = Path(str(self.path))
        if base.is_dir():
            for suffix in (".json", ".jsonl"):
                if (base / f"{split}{suffix}").is_file():
                    return base / f"{split}{suffix}", folder
            return None, None
        return (base, folder) if split == "train" else (None, None)


@dataclass
class Mixture:
    """Datasets with task names and weights; ``source`` is the YAML file (or ``"mixture"``)."""

    name: str
    entries: list[MixtureEntry]
    source: str = "mixture"

    @property
    def tasks(self) -> list[str]:
        """Task names in order of first appearance: the index of a name is its task id.

        A ``task: from_record`` entry contributes the tasks its train records name (the file is scanned
        once); such a task may not be one that another entry only gets from its name.
        """
        names: list[str] = []
        for entry in self.entries:
            names.extend(entry.record_tasks() if entry.from_record else [entry.task])
        implicit = {entry.task: entry.name for entry in self.entries if not entry.explicit_task}
        for entry in self.entries:
            clash = [t for t in entry.record_tasks() if t in implicit] if entry.from_record else []
            if clash:
                raise ConfigError(f"{self.source}: dataset {entry.name!r} has records of task {clash[0]!r}, which "
                                  f"dataset {implicit[clash[0]]!r} gets from its name; to train them as one task "
                                  f"write 'task: {clash[0]}' on {implicit[clash[0]]!r}, otherwise rename one")
        return list(dict.fromkeys(names))

    def load(self, split: str = "train", seed: int = 0, on_error: str = "fail") -> list[Sample]:
        """Every entry's samples of ``split``, in entry order.

        Each sample gets ``task`` = the entry's task (under ``task: from_record``, its record's own) and
        ``dataset`` = the entry's name. ``max_samples``
        keeps a seeded random subset (in file order) that depends only on (seed, entry name, split).
        ``on_error`` applies to entries without their own ``on_error``. Entries without ``split`` are
        left out, except that every entry must have train data.
        """
        if split not in SPLITS:
            raise ConfigError(f"split: {split!r} is not one of {SPLITS}")
        samples: list[Sample] = []
        for entry in self.entries:
            file, folder = entry.split_file(split)
            if file is None:
                if split == "train":
                    raise ConfigError(f"{self.source}: dataset {entry.name!r} has no train data")
                continue
            rows, _ = read_samples_with_report(
                file, image_folder=folder, on_error=entry.on_error or on_error, task=entry.task,
                max_images_per_sample=entry.max_images_per_sample,
                auto_insert_image_token=entry.auto_insert_image_token, record_format=entry.record_format)
            if entry.max_samples is not None and len(rows) > entry.max_samples:
                order = list(range(len(rows)))
                random.Random(f"{seed}:{entry.name}:{split}").shuffle(order)  # str seeds hash stably (sha512)
                rows = [rows[i] for i in sorted(order[: entry.max_samples])]
            for row in rows:
                row.dataset = entry.name
            samples.extend(rows)
        return samples

    def sampling_weights(self, samples: list[Sample]) -> list[float]:
        """Per-sample weights for a weighted sampler (e.g. ``torch.utils.data.WeightedRandomSampler``).

        Each dataset's total is proportional to its ``weight`` whatever its size: a sample of dataset d
        gets ``weight_d / (count_d * sum of weights of the datasets present)``, so the weights sum to 1.
        Samples must come from :meth:`load` (their ``dataset`` names an entry).
        """
        weight = {entry.name: entry.weight for entry in self.entries}
        counts: dict[str, int] = {}
        for sample in samples:
            if sample.dataset not in weight:
                raise ConfigError(f"{sample.source or sample.id}: sample of dataset {sample.dataset!r}, which is "
                                  f"not in mixture {self.name!r} (datasets: {list(weight)})")
            counts[sample.dataset] = counts.get(sample.dataset, 0) + 1
        total = sum(weight[name] for name in counts)
        return [weight[s.dataset] / (counts[s.dataset] * total) for s in samples]  # type: ignore[index]


def _check_keys(values: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}; valid keys: {', '.join(allowed)}")


def _string(values: dict[str, Any], key: str, where: str) -> str | None:
    value = values.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _entry(values: Any, index: int, source: str, base: Path | None) -> MixtureEntry:
    where = f"{source}: datasets[{index}]"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping with name, builtin or path, task, weight; got {values!r}")
    _check_keys(values, ENTRY_KEYS, where)
    if sum(key in values for key in SOURCE_KEYS) != 1:
        raise ConfigError(f"{where}: give exactly one of 'builtin' (a built-in dataset), 'path' (a data file) or "
                          "'registry' (LLaMA-Factory's dataset_info.json, with the dataset's 'name')")
    builtin, path = _string(values, "builtin", where), _string(values, "path", where)
    registry = _string(values, "registry", where)
    if builtin is not None:
        for key in PATH_ONLY_KEYS:
            if key in values:
                raise ConfigError(f"{where}.{key}: only for 'path' entries (a built-in dataset has its own)")
        try:
            from asymlora.builtin_data import BUILDERS  # lazy: the datasets package is optional here
        except ImportError:
            BUILDERS = None  # noqa: N806 - without the package, the name is checked when loading
        if BUILDERS is not None and builtin not in BUILDERS:
            raise ConfigError(f"{where}.builtin: {builtin!r} is not one of {sorted(BUILDERS)}{did_you_mean(builtin, BUILDERS)}")
    if registry is not None and "name" not in values:
        raise ConfigError(f"{where}.name: a 'registry' entry names the dataset of {registry} to read")
    if registry is not None and "splits" in values:
        raise ConfigError(f"{where}.splits: a 'registry' entry reads its dataset as the train split; give "
                          "validation data as a 'path' entry's splits")
    name = _string(values, "name", where) or builtin or Path(str(path)).stem
    task = _string(values, "task", where)
    if task is None and name == FROM_RECORD:
        raise ConfigError(f"{where}.task: {FROM_RECORD!r} is not a task name; give this entry its 'task:'")
    weight = values.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{where}.weight: must be a finite number > 0, got {weight!r}")
    for key, low in (("max_samples", 1), ("max_images_per_sample", 0)):
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{where}.{key}: must be an integer >= {low}, got {value!r}")
    on_error = values.get("on_error")
    if on_error is not None and on_error not in ON_ERROR:
        raise ConfigError(f"{where}.on_error: {on_error!r} is not one of {ON_ERROR}")
    auto_insert = values.get("auto_insert_image_token", False)
    if not isinstance(auto_insert, bool):
        raise ConfigError(f"{where}.auto_insert_image_token: must be true or false, got {auto_insert!r}")

    def resolve(p: str) -> str:
        resolved = Path(p).expanduser()
        return str(resolved if resolved.is_absolute() or base is None else base / resolved)

    splits = values.get("splits") or {}
    if (not isinstance(splits, dict) or any(k not in SPLITS for k in splits)
            or any(not isinstance(v, str) for v in splits.values())):
        raise ConfigError(f"{where}.splits: expected a mapping from {SPLITS} to files, got {splits!r}")
    image_folder = _string(values, "image_folder", where)
    record_format = None
    if registry is not None:
        registry = resolve(registry)
        path, record_format = _registry_dataset(Path(registry), name, where)
        image_folder = image_folder or str(Path(registry).parent)  # LLaMA-Factory's media_dir default
    return MixtureEntry(
        name=name, task=task or name, weight=float(weight), builtin=builtin,
        path=resolve(path) if path is not None else None,
        image_folder=resolve(image_folder) if image_folder else None,
        registry=registry, record_format=record_format,
        max_samples=values.get("max_samples"), splits={k: resolve(v) for k, v in splits.items()},
        on_error=on_error, max_images_per_sample=values.get("max_images_per_sample"),
        auto_insert_image_token=auto_insert, explicit_task=task is not None,
    )


def _registry_dataset(registry: Path, name: str, where: str) -> tuple[str, RecordFormat]:
    """(data file, record format) of dataset ``name`` in LLaMA-Factory's ``dataset_info.json`` ``registry``."""
    if not registry.is_file():
        raise ConfigError(f"{where}.registry: {registry} not found")
    try:
        datasets = json.loads(registry.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{registry}: not valid JSON: {err}") from None
    if not isinstance(datasets, dict):
        raise ConfigError(f"{registry}: expected an object mapping dataset names to their descriptions")
    if name not in datasets:
        raise ConfigError(f"{where}.name: {name!r} is not a dataset of {registry}{did_you_mean(name, datasets)}")
    spec, at = datasets[name], f"{registry}: {name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{at}: expected an object with 'file_name', got {spec!r}")
    remote = [key for key in REMOTE_KEYS if spec.get(key)]
    if remote:
        raise ConfigError(f"{at}: {remote[0]}: a dataset that is not a local file; download it and describe it "
                          "with 'file_name'")
    if spec.get("ranking"):
        raise ConfigError(f"{at}: ranking: preference data (chosen/rejected) is not supervised fine-tuning data")
    file_name = spec.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise ConfigError(f"{at}: file_name: expected the data file's name (relative to {registry.parent}), "
                          f"got {file_name!r}")
    file = registry.parent / file_name
    if not file.is_file():
        raise ConfigError(f"{at}: file_name: {file} is not a file (a JSON list or JSON Lines file is read)")
    return str(file), RecordFormat.from_registry(spec, at)


def _check_shared_tasks(entries: list[MixtureEntry], source: str) -> None:
    """Dataset names are unique; entries share a task only where each one names it with ``task:``."""
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: dataset names must be unique; repeated: {duplicates} (give each entry "
                          "its own 'name')")
    for i, entry in enumerate(entries):
        sharing = [j for j, other in enumerate(entries) if other.task == entry.task and j != i]
        if sharing and not entry.explicit_task:
            raise ConfigError(
                f"{source}: datasets[{i}] ({entry.name!r}) gets task {entry.task!r} from its name, and "
                f"datasets[{sharing[0]}] ({entries[sharing[0]].name!r}) has the same task. To train them as "
                f"one task write 'task: {entry.task}' on both; otherwise give them different tasks")


def builtin_mixtures() -> list[str]:
    """Names of the mixtures shipped in ``asymlora/mixtures``."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_mixture(spec: str | Path | dict[str, Any]) -> Mixture:
    """A validated mixture from a built-in name (``"mix5"``), a YAML file or a mapping.

    Raises ConfigError naming the file, the entry and the key for: unknown keys (with the closest
    valid one), not exactly one of builtin/path/registry, a registry dataset that is not a local file in
    a formatting this reader takes, weight <= 0, bad max_samples, repeated dataset names,
    a task shared with an entry that did not name it explicitly.
    """
    base: Path | None = None
    if isinstance(spec, dict):
        values, source = spec, "mixture"
    elif isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if not path.exists() and not path.suffix and len(path.parts) == 1:
            path = BUILTIN_DIR / f"{spec}.yaml"
            if not path.is_file():
                known = builtin_mixtures()
                raise ConfigError(f"mixture: {str(spec)!r} is neither a file nor a built-in mixture {known}"
                                  f"{did_you_mean(spec, known)}")
        if not path.is_file():
            raise ConfigError(f"mixture: {path} not found")
        values, source, base = read_yaml(path, "a mixture: a mapping with 'name' and 'datasets'"), str(path), path.parent
    else:
        raise ConfigError(f"mixture: expected a name, a YAML path or a mapping, got {type(spec).__name__}")
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: a mixture is a mapping with 'name' and 'datasets', got {values!r}")
    _check_keys(values, MIXTURE_KEYS, source)
    if not isinstance(values.get("datasets"), list) or not values["datasets"]:
        raise ConfigError(f"{source}: datasets: a mixture needs 'datasets:', a non-empty list of entries")
    entries = [_entry(v, i, source, base) for i, v in enumerate(values["datasets"])]
    _check_shared_tasks(entries, source)
    default_name = Path(source).stem if base is not None else "mixture"
    return Mixture(name=str(values.get("name") or default_name), entries=entries, source=source)
