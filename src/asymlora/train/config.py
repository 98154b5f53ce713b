"""The training config: its schema (four sections, top-level keys), validation and ``key=value`` overrides.

One YAML file holds four sections and top-level keys::

    model:    {path: default | LOCAL_HF_DIR, dtype: float32, projector: null | FILE.safetensors,
               quantization: null | {bits: 4 | 8, quant_type: nf4, compute_dtype: float32, double_quant: false}}
    data:     {mixture: mix5 | FILE.yaml | {inline}, max_length: 1024, eval_split: val, ...}
    adapter:  AsymLoraConfig fields (tasks default to the mixture's task names)
    training: transformers.TrainingArguments fields (output_dir, learning_rate, bf16, ...)
    projector_lr: 2.0e-5      # learning rate of modules_to_save (e.g. the projector); null = same as lr
    router_lr: null           # learning rate of the routers and task biases; null = same as lr
    loraplus_lr_ratio: null   # LoRA+: the B banks learn at lr * ratio (A at lr); null = same as lr
    loss_average: tokens      # LM loss: mean over supervised tokens, or 'samples' (each sample's mean, then
                              # the mean over samples: a one-word answer weighs as much as a long caption)
    resume: false             # true = the newest complete checkpoint of this config in output_dir, or a path
    replace_run: false        # true = move another run found in output_dir to <output_dir>.replaced-N
                              # (otherwise a run of another config there is refused)

Loss = LM loss (mean over supervised tokens only, across gradient accumulation and ranks; or over
samples, with ``loss_average: samples``)
+ adapter.balance_loss_weight * aux loss. Per-task LM loss, router entropy and expert load are
logged every logging step. Every checkpoint holds the full adapter (asymlora's format), optimizer,
scheduler, RNG and data position; resuming continues exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.config import AsymLoraConfig
from asymlora.errors import ConfigError, did_you_mean
from asymlora.io import check_output_dir, load_yaml, read_yaml
from asymlora.quantization import check_quantization
from asymlora.train.distributed import CPU_OFFLOAD_OPTIMS, has_accelerator, offloads_optimizer

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = ("model", "data", "adapter", "training", "projector_lr", "router_lr", "loraplus_lr_ratio", "loss_average",
            "resume", "replace_run")
LOSS_AVERAGES = ("tokens", "samples")


@dataclass
class ModelSection:
    path: str = field(default="default", metadata={"help": "'default' (the built offline model), 'tiny' (a tiny "
                                                           "random LLaVA for smoke tests) or a local HF dir"})
    dtype: str = field(default="float32", metadata={"help": "dtype to load the frozen model in"})
    projector: str | None = field(default=None, metadata={"help": "projector weights to load: a safetensors file, "
                                                                  "or 'aligned' (the shipped stage-1 projector)"})
    quantization: dict[str, Any] | None = field(default=None, metadata={
        "help": "null (a float base) or {bits: 4|8, quant_type: nf4|fp4, compute_dtype: float32|bfloat16|float16, "
                "double_quant: false}: the base loaded quantized by bitsandbytes (QLoRA; asymlora.quantization)"})


@dataclass
class DataSection:
    mixture: Any = field(default="mix5", metadata={"help": "mixture name, YAML path, or inline mapping"})
    max_length: int = field(default=1024, metadata={"help": "token limit; longer samples are cut after their "
                                                            "last image token or skipped and reported"})
    on_error: str = field(default="fail", metadata={"help": "fail | skip: what to do with malformed samples"})
    eval_split: str | None = field(default="val", metadata={"help": "split for evaluation during training"})
    max_eval_samples: int | None = field(default=256, metadata={"help": "cap on evaluation samples"})
    max_train_samples: int | None = field(default=None, metadata={"help": "cap on training samples (seeded)"})
    num_samples: int | None = field(default=None, metadata={"help": "samples drawn per epoch by the weighted "
                                                                    "mixture sampler (default: dataset size)"})
    group_by_length: bool = field(default=False, metadata={"help": "batch samples of similar length together "
                                                                    "(batches then tend to hold one task)"})


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    projector_lr: float | None = None
    router_lr: float | None = None
    loraplus_lr_ratio: float | None = None
    loss_average: str = "tokens"
    resume: bool | str = False
    replace_run: bool = False
    source: str = "config"

    def adapter_config(self, mixture_tasks: Sequence[str]) -> AsymLoraConfig:
        values = dict(self.adapter)
        tasks = values.get("tasks") or list(mixture_tasks)
        missing = [t for t in mixture_tasks if t not in tasks]
        if missing:
            raise ConfigError(f"{self.source}: adapter.tasks: {tasks} lacks the mixture's tasks {missing}")
        values["tasks"] = tasks
        return AsymLoraConfig.from_dict(values, source=f"{self.source}: adapter")

    def training_arguments(self) -> Any:
        from transformers import TrainingArguments

        values = {
            "output_dir": str(Path("runs") / Path(self.source).stem),
            "remove_unused_columns": False,
            "label_names": ["labels"],
            "prediction_loss_only": True,
            "report_to": ["tensorboard"],
            "logging_steps": 10,
            "save_strategy": "steps",
            "save_steps": 200,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "learning_rate": 2e-4,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0,
            "dataloader_num_workers": 0,
        }
        if not has_accelerator():  # pinning needs one; torch warns on every dataloader otherwise
            values["dataloader_pin_memory"] = False
        values.update(self.training)
        for key, value in list(values.items()):  # YAML 1.1 reads a bare `no` as False
            if key.endswith("_strategy") and value is False:
                values[key] = "no"
        for key in self.training:
            check_training_value(key, values[key], self.source)
        check_output_dir(values["output_dir"], f"{self.source}: training.output_dir")
        # transformers 5.24 renamed gradient_checkpointing[_kwargs] to activation_checkpointing[_kwargs]: the
        # presets use the old names (all versions know them), passed on under the names this version reads.
        new_name = "activation_checkpointing" in _training_fields()
        for suffix in ("", "_kwargs"):
            if new_name and values.get(f"activation_checkpointing{suffix}") is None and \
                    f"gradient_checkpointing{suffix}" in values:
                values[f"activation_checkpointing{suffix}"] = values.pop(f"gradient_checkpointing{suffix}")
        prefix = "activation" if new_name else "gradient"
        if values.get(f"{prefix}_checkpointing") and not values.get(f"{prefix}_checkpointing_kwargs"):
            values[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}  # non-reentrant by default
        try:
            args = TrainingArguments(**values)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.source}: training: {err}") from None
        ds_config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
        if offloads_optimizer(ds_config) and args.optim not in CPU_OFFLOAD_OPTIMS:
            raise ConfigError(f"{self.source}: training.optim: {getattr(args.optim, 'value', args.optim)!r} has no "
                              "DeepSpeed CPU version, and under ZeRO-Offload (offload_optimizer in "
                              "training.deepspeed) accelerate would train with Adam in its place; use one of "
                              f"{CPU_OFFLOAD_OPTIMS}, or set zero_force_ds_cpu_optimizer: false in the DeepSpeed config")
        if "optimizer" in ds_config:
            # DeepSpeed would build its optimizer from model.parameters(): one group, so projector_lr,
            # router_lr and the routers' exemption from weight decay would be silently dropped.
            raise ConfigError(f"{self.source}: training.deepspeed: remove the 'optimizer' section; asymlora builds "
                              "the optimizer itself (training.optim, learning_rate, projector_lr, router_lr, "
                              "loraplus_lr_ratio) and "
                              "DeepSpeed runs it (ZeRO shards its state as usual)")
        return args

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping with sections {SECTIONS}")
        _check_keys(values, SECTIONS, source, "")
        model = values.get("model") or {}
        data = values.get("data") or {}
        _check_keys(model, [f.name for f in dataclasses.fields(ModelSection)], source, "model.")
        _check_keys(data, [f.name for f in dataclasses.fields(DataSection)], source, "data.")
        _check_keys(values.get("adapter") or {}, [f.name for f in dataclasses.fields(AsymLoraConfig)], source,
                    "adapter.")
        _check_keys(values.get("training") or {}, _training_fields(), source, "training.")
        if data.get("on_error", "fail") not in ("fail", "skip"):
            raise ConfigError(f"{source}: data.on_error: {data['on_error']!r} is not one of ('fail', 'skip')")
        replace_run = values.get("replace_run", False)
        if not isinstance(replace_run, bool):
            raise ConfigError(f"{source}: replace_run: {replace_run!r} is not true or false")
        if "quantization" in model:
            model = {**model, "quantization": check_quantization(model["quantization"], source)}
        loss_average = values.get("loss_average") or "tokens"
        if loss_average not in LOSS_AVERAGES:
            raise ConfigError(f"{source}: loss_average: {loss_average!r} is not one of {LOSS_AVERAGES}"
                              f"{did_you_mean(loss_average, LOSS_AVERAGES)}")
        return cls(model=ModelSection(**model), data=DataSection(**data), adapter=dict(values.get("adapter") or {}),
                   training=dict(values.get("training") or {}), projector_lr=_learning_rate(values, "projector_lr", source),
                   router_lr=_learning_rate(values, "router_lr", source),
                   loraplus_lr_ratio=_positive(values, "loraplus_lr_ratio", source, "a ratio (a number > 0, e.g. 16; "
                                               "null for B at learning_rate)"),
                   loss_average=loss_average, resume=values.get("resume", False), replace_run=replace_run,
                   source=source)

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
        path = Path(path)
        preset = PRESETS_DIR / f"{path.name}.yaml"
        if not path.is_file() and not path.suffix and preset.is_file():
            path = preset  # a preset name: asymlora train default_asymlora_moe
        if not path.is_file():
            presets = sorted(p.stem for p in preset.parent.glob("*.yaml"))
            raise ConfigError(f"{path}: config file not found (presets: {', '.join(presets)})")
        expected = "a training config: a mapping with model, data, adapter and training"
        values = read_yaml(path, expected)
        if values is None:
            raise ConfigError(f"{path}: the file is empty; expected {expected} (e.g. {PRESETS_DIR / 'tiny.yaml'})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected {expected}, got a {_yaml_type(values)}")
        values = apply_overrides(values, overrides, str(path))
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "adapter": self.adapter, "training": self.training, "projector_lr": self.projector_lr,
                "router_lr": self.router_lr, "loraplus_lr_ratio": self.loraplus_lr_ratio,
                "loss_average": self.loss_average, "resume": self.resume, "replace_run": self.replace_run}


def _learning_rate(values: dict[str, Any], key: str, source: str) -> float | None:
    """A top-level learning rate (``projector_lr`` / ``router_lr``): null, or a number > 0."""
    return _positive(values, key, source, "a learning rate (a number > 0, or null for training.learning_rate)")


def _positive(values: dict[str, Any], key: str, source: str, what: str) -> float | None:
    """A top-level number > 0 (or null) of the config, ``key`` naming it in the error."""
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ConfigError(f"{source}: {key}: {value!r} is not {what}")
    return float(value)


def _training_fields() -> list[str]:
    from transformers import TrainingArguments

    return [f.name for f in dataclasses.fields(TrainingArguments) if f.init]


def _yaml_type(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "value")


def check_training_value(key: str, value: Any, source: str = "config") -> None:
    """ConfigError naming ``training.<key>`` unless ``value`` fits the type that ``TrainingArguments``
    declares for ``key`` (numbers, flags, strings, the choices of its enums, lists, mappings, null where
    optional) and, where it is a number, is finite and >= 0 (or a field's negative default, e.g.
    ``max_steps: -1``, which means "not set")."""
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    if key not in fields:
        return
    annotation = typing.get_type_hints(TrainingArguments)[key]
    where = f"{source}: training.{key}"
    if not _fits(value, annotation):
        choices = [m.value for e in _enums(annotation) for m in e]
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ConfigError(f"{where}: expected {_describe(annotation)}, got {value!r}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        default = fields[key].default
        unset = isinstance(default, (int, float)) and not isinstance(default, bool) and default < 0
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        if value < 0 and not (unset and value == default):
            raise ConfigError(f"{where}: must be >= 0{f' (or {default}: not set)' if unset else ''}, got {value!r}")


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def _enums(annotation: Any) -> list[type[enum.Enum]]:
    members = _union_args(annotation) or (annotation,)
    return [a for a in members if isinstance(a, type) and issubclass(a, enum.Enum)]


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a ``TrainingArguments`` annotation (a string for an enum: one of its values)."""
    members = _union_args(annotation)
    if members is not None:
        enums = _enums(annotation)
        if enums and isinstance(value, str):  # `SchedulerType | str`: the string names a member
            return any(value in {m.value for m in e} for e in enums)
        return any(_fits(value, member) for member in members)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return any(value is a or (type(value) is type(a) and value == a) for a in args)
    if origin in (list, tuple, set, Sequence):
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    if annotation in (str, dict, list):
        return isinstance(value, annotation)
    return True  # a type YAML cannot write (e.g. accelerate's ParallelismConfig): TrainingArguments checks it


def _describe(annotation: Any) -> str:
    """What a ``TrainingArguments`` annotation accepts, in words."""
    members = _union_args(annotation)
    if members is not None:
        enums = _enums(annotation)
        words = [_describe(m) for m in members if not (enums and m is str)]
        return " or ".join(dict.fromkeys(words))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"one of {[m.value for m in annotation]}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             dict: "a mapping", list: "a list"}
    return names.get(origin or annotation, getattr(annotation, "__name__", str(annotation)))


def _check_keys(values: Any, allowed: Sequence[str], source: str, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    for key in values:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key {prefix}{key}{did_you_mean(key, allowed, prefix)}")


def apply_overrides(values: dict[str, Any], overrides: Sequence[str], source: str = "config") -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a config mapping."""
    values = dict(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. training.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        parsed = load_yaml(raw) if raw else None
        parts = key.strip().split(".")
        if parts[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {parts[0]!r}{did_you_mean(parts[0], SECTIONS)}")
        target = values
        for part in parts[:-1]:
            if not isinstance(target.get(part) or {}, dict):
                raise ConfigError(f"override {item!r}: {part} is {target[part]!r}, not a mapping")
            target[part] = dict(target.get(part) or {})
            target = target[part]
        target[parts[-1]] = parsed
    return values


