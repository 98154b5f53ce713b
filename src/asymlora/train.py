"""`asymlora train CONFIG.yaml [key=value ...]`: multi-task visual instruction tuning on HF Trainer.

One YAML file holds four sections and three top-level keys::

    model:    {path: default | LOCAL_HF_DIR, dtype: float32, projector: null | FILE.safetensors}
    data:     {mixture: mix5 | FILE.yaml | {inline}, max_length: 1024, eval_split: val, ...}
    adapter:  AsymLoraConfig fields (tasks default to the mixture's task names)
    training: transformers.TrainingArguments fields (output_dir, learning_rate, bf16, ...)
    projector_lr: 2.0e-5      # learning rate of modules_to_save (e.g. the projector); null = same as lr
    router_lr: null           # learning rate of the routers and task biases; null = same as lr
    loraplus_lr_ratio: null   # LoRA+: the B banks learn at lr * ratio (A at lr); null = same as lr
    loss_average: tokens      # LM loss: mean over supervised tokens, or 'samples' (each sample's mean, then
                              # the mean over samples: a one-word answer weighs as much as a long caption)
    resume: false             # true = the last complete checkpoint in output_dir, or a checkpoint path

Loss = LM loss (mean over supervised tokens only, across gradient accumulation and ranks; or over
samples, with ``loss_average: samples``)
+ adapter.balance_loss_weight * aux loss. Per-task LM loss, router entropy and expert load are
logged every logging step. Every checkpoint holds the full adapter (asymlora's format), optimizer,
scheduler, RNG and data position; resuming continues exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import Dataset, Sampler

from asymlora.config import AsymLoraConfig
from asymlora.errors import AsymLoraError, ConfigError, MissingAssetError, did_you_mean
from asymlora.io import load_yaml, read_yaml, write_json_atomic, write_text_atomic

SECTIONS = ("model", "data", "adapter", "training", "projector_lr", "router_lr", "loraplus_lr_ratio", "loss_average",
            "resume")
LOSS_AVERAGES = ("tokens", "samples")


@dataclass
class ModelSection:
    path: str = field(default="default", metadata={"help": "'default' (the built offline model), 'tiny' (a tiny "
                                                           "random LLaVA for smoke tests) or a local HF dir"})
    dtype: str = field(default="float32", metadata={"help": "dtype to load the frozen model in"})
    projector: str | None = field(default=None, metadata={"help": "projector weights to load: a safetensors file, "
                                                                  "or 'aligned' (the shipped stage-1 projector)"})


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
        if not _has_accelerator():  # pinning needs one; torch warns on every dataloader otherwise
            values["dataloader_pin_memory"] = False
        values.update(self.training)
        for key, value in list(values.items()):  # YAML 1.1 reads a bare `no` as False
            if key.endswith("_strategy") and value is False:
                values[key] = "no"
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
        loss_average = values.get("loss_average") or "tokens"
        if loss_average not in LOSS_AVERAGES:
            raise ConfigError(f"{source}: loss_average: {loss_average!r} is not one of {LOSS_AVERAGES}"
                              f"{did_you_mean(loss_average, LOSS_AVERAGES)}")
        return cls(model=ModelSection(**model), data=DataSection(**data), adapter=dict(values.get("adapter") or {}),
                   training=dict(values.get("training") or {}), projector_lr=_learning_rate(values, "projector_lr", source),
                   router_lr=_learning_rate(values, "router_lr", source),
                   loraplus_lr_ratio=_positive(values, "loraplus_lr_ratio", source, "a ratio (a number > 0, e.g. 16; "
                                               "null for B at learning_rate)"),
                   loss_average=loss_average, resume=values.get("resume", False), source=source)

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
        path = Path(path)
        preset = Path(__file__).resolve().parent / "configs" / f"{path.name}.yaml"
        if not path.is_file() and not path.suffix and preset.is_file():
            path = preset  # a preset name: asymlora train default_asymlora_moe
        if not path.is_file():
            presets = sorted(p.stem for p in preset.parent.glob("*.yaml"))
            raise ConfigError(f"{path}: config file not found (presets: {', '.join(presets)})")
        values = read_yaml(path, "a training config: a mapping with model, data, adapter and training") or {}
        values = apply_overrides(values, overrides, str(path))
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "adapter": self.adapter, "training": self.training, "projector_lr": self.projector_lr,
                "router_lr": self.router_lr, "loraplus_lr_ratio": self.loraplus_lr_ratio,
                "loss_average": self.loss_average, "resume": self.resume}


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
            target[part] = dict(target.get(part) or {})
            target = target[part]
        target[parts[-1]] = parsed
    return values


# ---------------------------------------------------------------------------------------------- data
class EncodedDataset(Dataset):
    """Samples encoded on access by a :class:`~asymlora.data.collator.SampleEncoder`."""

    def __init__(self, samples: Sequence[Any], encoder: Any) -> None:
        self.samples = list(samples)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.encoder(self.samples[index])


class MixtureSampler(Sampler[int]):
    """Weighted multi-task sampling (with replacement), optionally grouped by length.

    The order depends only on (seed, epoch), so a resumed run that skips the batches already seen gets
    exactly the samples the uninterrupted run would have.
    """

    def __init__(self, weights: Sequence[float], num_samples: int, seed: int, lengths: Sequence[int] | None = None,
                 group_size: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self.lengths = list(lengths) if lengths is not None else None
        self.group_size = group_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()
        if self.lengths is not None and self.group_size > 1:
            groups = [order[i:i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = [i for g in groups for i in sorted(g, key=lambda j: -self.lengths[j])]
        return iter(order)


# ---------------------------------------------------------------------------------------------- trainer
class NonFiniteLossError(AsymLoraError):
    """The training loss became NaN or inf."""


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token cross entropy (B, T-1), 0 where the label is -100, and the mask of the
    supervised positions. The training loss is its sum over supervised tokens divided by their count."""
    logits = logits[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="none").view(targets.shape)
    return token_loss, targets != -100


# training.optim values that ZeRO-Offload keeps: accelerate swaps the optimizer for DeepSpeed's CPU version
# (param groups kept), AdamW -> DeepSpeedCPUAdam in AdamW mode, Adagrad -> DeepSpeedCPUAdagrad; any other
# optimizer it would silently replace by Adam.
CPU_OFFLOAD_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adagrad")


def _has_accelerator() -> bool:
    """Whether torch sees a device that pinned host memory would feed (CUDA, XPU, MPS, ...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed (its config; {} without DeepSpeed) steps the optimizer on the CPU (ZeRO-Offload)
    with its own CPU optimizer."""
    device = (ds_config.get("zero_optimization") or {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme") and ds_config.get("zero_force_ds_cpu_optimizer", True) is not False


def last_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The run's last complete checkpoint: the ``checkpoint-N`` dir of the highest N that holds the Trainer's
    state (a dir without it was cut off while being written, and the Trainer cannot resume from it), or None
    when there is none (or no ``output_dir``)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    names = (re.fullmatch(r"checkpoint-(\d+)", p.name) for p in out.iterdir())
    steps = {int(m[1]): out / m[0] for m in names if m and (out / m[0] / "trainer_state.json").is_file()}
    return steps[max(steps)] if steps else None


def make_trainer_class() -> type:
    """Build the Trainer subclass (transformers is imported lazily so the CLI starts fast)."""
    from transformers import Trainer

    import asymlora

    class AsymLoraTrainer(Trainer):
        """HF Trainer with the asymlora loss, per-task logging, adapter checkpoints and mixture sampling."""

        def __init__(self, *args: Any, tasks: Sequence[str] = (), projector_lr: float | None = None,
                     router_lr: float | None = None, loraplus_lr_ratio: float | None = None,
                     loss_average: str = "tokens",
                     sampler_weights: Sequence[float] | None = None, sample_lengths: Sequence[int] | None = None,
                     num_samples: int | None = None, group_by_length: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tasks = list(tasks)
            self.projector_lr = projector_lr
            self.router_lr = router_lr
            self.loraplus_lr_ratio = loraplus_lr_ratio
            self.loss_average = loss_average
            self.sampler_weights = sampler_weights
            self.sample_lengths = sample_lengths
            self.num_samples = num_samples
            self.group_by_length = group_by_length
            self._task_sums = torch.zeros(max(len(self.tasks), 1), 2, dtype=torch.float64)
            self._aux_sum = torch.zeros((), dtype=torch.float64)
            self._aux_count = 0

        @property
        def adapter_model(self) -> Any:
            return self.accelerator.unwrap_model(self.model)

        # ---- data -----------------------------------------------------------------------------------
        def _get_train_sampler(self, train_dataset: Any = None) -> Sampler | None:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            weights = self.sampler_weights or [1.0] * len(dataset)
            group = self.args.per_device_train_batch_size * self.args.world_size * 50 if self.group_by_length else 0
            return MixtureSampler(weights, self.num_samples or len(dataset), self.args.seed,
                                  lengths=self.sample_lengths, group_size=group)

        # ---- optimisation ---------------------------------------------------------------------------
        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            if self.optimizer is not None:
                return self.optimizer
            wrapped = self.adapter_model
            saved = tuple(prefix + "." for prefix in wrapped.saved_modules)
            decay = set(self.get_decay_parameter_names(wrapped.base_model))
            # Kinds, in this order (the Trainer logs the learning rate of group 0): 0 adapter A/B banks,
            # 1 routers and task biases (router_lr), 2 modules_to_save (projector_lr), 3 the B banks
            # when LoRA+ gives them their own rate (only then, so older checkpoints' groups still match).
            split_B = self.loraplus_lr_ratio is not None
            groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
            for name, param in wrapped.base_model.named_parameters():
                if not param.requires_grad:
                    continue
                is_router = ".router." in name or name.endswith("task_bias")
                kind = 2 if name.startswith(saved) else 1 if is_router else 0
                if kind == 0 and split_B and name.endswith(".B_bank"):
                    kind = 3
                # Routers and task biases are not decayed: decay would pull routing toward uniform.
                decays = name in decay and not is_router
                groups.setdefault((kind, decays), []).append(param)
            rates = {1: self.router_lr, 2: self.projector_lr,
                     3: self.args.learning_rate * self.loraplus_lr_ratio if split_B else None}
            param_groups = []
            for (kind, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
                group: dict[str, Any] = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
                if rates.get(kind) is not None:
                    group["lr"] = rates[kind]
                param_groups.append(group)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, wrapped)
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
            return self.optimizer

        # ---- loss -----------------------------------------------------------------------------------
        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self.loss_average == "samples" and num_items is not None:
                # Samples with a supervised token, counted like the Trainer counts tokens (labels[..., 1:],
                # over the accumulation steps, across ranks when it averages across devices).
                num_items = sum(batch["labels"][..., 1:].ne(-100).any(-1).sum() for batch in batches)
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    num_items = self.accelerator.gather(num_items.to(device)).sum()
                num_items = num_items.to(device)
            return batches, num_items

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            task_ids = inputs.pop("task_ids", None)
            outputs = model(**inputs, task_ids=task_ids, routing_labels=labels)
            token_loss, supervised = next_token_loss(outputs.logits, labels)
            sample_sums = token_loss.sum(dim=1)
            sample_counts = supervised.sum(dim=1)
            if self.loss_average == "samples":  # each sample's token mean: the items are samples
                numerator = (sample_sums / sample_counts.clamp(min=1)).sum()
                local_items = (sample_counts > 0).sum()
            else:
                numerator, local_items = sample_sums.sum(), sample_counts.sum()
            if num_items_in_batch is not None and model.training:
                # Mean over every item (supervised token, or sample) of the accumulated global batch (the
                # Trainer counts them across accumulation steps and ranks; ranks' gradients are averaged).
                lm_loss = numerator / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    lm_loss = lm_loss * self.accelerator.num_processes
                aux_scale = 1.0 / self.current_gradient_accumulation_steps
            else:
                lm_loss = numerator / local_items.clamp(min=1)
                aux_scale = 1.0
            wrapped = self.adapter_model
            aux = wrapped.aux_loss
            weight = wrapped.asymlora_config.balance_loss_weight
            loss = lm_loss + weight * aux * aux_scale if weight and aux.requires_grad else lm_loss
            if model.training:
                self._record_task_losses(sample_sums.detach(), sample_counts.detach(), task_ids)
                self._aux_sum = self._aux_sum.to(aux.device) + aux.detach().double()  # no device sync per step
                self._aux_count += 1
            return (loss, outputs) if return_outputs else loss

        def _record_task_losses(self, sums: torch.Tensor, counts: torch.Tensor, task_ids: Any) -> None:
            if task_ids is None or not self.tasks:
                return
            ids = task_ids.to(sums.device)
            known = ids >= 0
            table = torch.zeros(len(self.tasks), 2, dtype=torch.float64, device=sums.device)
            table[:, 0].index_add_(0, ids[known], sums[known].double())
            table[:, 1].index_add_(0, ids[known], counts[known].double())
            self._task_sums = self._task_sums.to(sums.device) + table

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
            with self.adapter_model.collect_routing_stats():
                loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                last = last_checkpoint(self.args.output_dir)
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at step {self.state.global_step + 1}; training stopped. "
                    f"The last good checkpoint is {last or 'none (no checkpoint was saved yet)'}; lower "
                    "training.learning_rate or enable training.max_grad_norm and resume from it."
                )
            return loss

        # ---- logging --------------------------------------------------------------------------------
        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and "eval_loss" not in logs:
                logs.update(self._training_metrics())
            super().log(logs, start_time)

        def _training_metrics(self) -> dict[str, float]:
            metrics: dict[str, float] = {}
            device = self.args.device
            sums = self._task_sums.to(device)
            aux = torch.stack([self._aux_sum.to(device), torch.tensor(float(self._aux_count), dtype=torch.float64,
                                                                   device=device)])
            stats = self.adapter_model.pop_routing_stats()
            entropy = torch.zeros(2, dtype=torch.float64, device=device)
            load, load_layers = None, 0
            for entry in stats.values():
                entropy += torch.stack([entry["entropy_sum"].double(), entry["tokens"].double()]).to(device)
                layer_load = entry["load"].double().to(device)
                share = layer_load / layer_load.sum().clamp(min=1e-12)
                if load is None or load.shape == share.shape:  # per-expert shares of layers with the first E
                    load = share if load is None else load + share
                    load_layers += 1
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
                aux = self.accelerator.reduce(aux, reduction="sum")
                entropy = self.accelerator.reduce(entropy, reduction="sum")
                if load is not None:
                    load = self.accelerator.reduce(load, reduction="mean")
            for i, task in enumerate(self.tasks):
                if sums[i, 1] > 0:
                    metrics[f"loss_{task}"] = round(float(sums[i, 0] / sums[i, 1]), 4)
            if aux[1] > 0 and any(layer.router is not None for layer in self.adapter_model.adapter_layers.values()):
                metrics["aux_loss"] = round(float(aux[0] / aux[1]), 4)
            if entropy[1] > 0:
                metrics["router_entropy"] = round(float(entropy[0] / entropy[1]), 4)
            if load is not None:
                load = load / load_layers
                for e, share in enumerate(load.tolist()):
                    metrics[f"expert_load_{e}"] = round(share, 4)
            if device.type == "cuda":  # the highest allocation of this process's GPU so far, in MiB
                metrics["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            self._task_sums = torch.zeros_like(self._task_sums)
            self._aux_sum = torch.zeros((), dtype=torch.float64)
            self._aux_count = 0
            return metrics

        # ---- checkpoints ----------------------------------------------------------------------------
        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            # Under FSDP / DeepSpeed ZeRO-3, save_model gathers the full state dict on every rank and
            # hands it here; otherwise the adapter reads its own (unsharded) parameters.
            output_dir = output_dir or self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            self.adapter_model.save_pretrained(output_dir, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not self.is_deepspeed_enabled:
                return super()._save_optimizer_and_scheduler(output_dir)
            # DeepSpeed's own checkpoint (optimizer partitions, its module state), without the frozen base
            # weights: the Trainer leaves them out only for PEFT models, and a copy of the base model in every
            # checkpoint is what a 7B run cannot afford. Resuming accepts their absence, and only theirs
            # (AsymLoraModel.load_state_dict).
            engine = self.model_wrapped
            if "exclude_frozen_parameters" in inspect.signature(engine.save_checkpoint).parameters:
                engine.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            else:  # an older DeepSpeed: the whole module state
                engine.save_checkpoint(output_dir)
            from accelerate.utils import DeepSpeedSchedulerWrapper
            from transformers.trainer import SCHEDULER_NAME

            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            asymlora.load(self.adapter_model, resume_from_checkpoint)

        def _load_best_model(self) -> None:
            if self.state.best_model_checkpoint:
                asymlora.load(self.adapter_model, self.state.best_model_checkpoint)

    return AsymLoraTrainer


# ---------------------------------------------------------------------------------------------- driver
def resolve_model_dir(path: str) -> Path:
    """'default' (the built offline model), 'tiny' (a tiny random LLaVA, built on first use) or a local dir."""
    if path == "tiny":
        from asymlora.assets import cache_dir
        from asymlora.tiny import build_tiny

        model_dir = cache_dir() / "models" / "tiny"
        return model_dir if (model_dir / "config.json").is_file() else build_tiny(model_dir)
    if path == "default":
        from asymlora import zoo

        model_dir = zoo.default_model_dir()
        if zoo.read_manifest(model_dir) is None:
            raise MissingAssetError(f"model.path: the default model is not built at {model_dir}. Run: asymlora setup "
                                    "--only smollm2 gguf dinov2 onnx ml_dtypes protobuf && asymlora build-default")
        return model_dir
    model_dir = Path(path).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.path: {model_dir} is not a local Hugging Face model directory (no config.json)")
    return model_dir


def _gathered(module: torch.nn.Module) -> Any:
    """A context in which ``module``'s parameters are whole: ZeRO-3 partitions them while loading."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    # Every rank writes the same values; rank 0's are kept and partitioned again on exit.
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


def load_model_and_processor(section: ModelSection) -> tuple[Any, Any]:
    """Load the frozen base model (its Auto class follows its config) and its processor."""
    import transformers

    from asymlora.config import TORCH_DTYPES
    from asymlora.model_cli import load_base_model

    model_dir = resolve_model_dir(section.path)
    if section.dtype not in TORCH_DTYPES:
        raise ConfigError(f"model.dtype: {section.dtype!r} is not one of {tuple(TORCH_DTYPES)}")
    model = load_base_model(model_dir, dtype=TORCH_DTYPES[section.dtype])
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        processor = transformers.AutoTokenizer.from_pretrained(model_dir)
    if section.projector:
        from asymlora.zoo import find_projector, load_projector

        path = section.projector
        if path == "aligned":
            from asymlora.align import aligned_projector_path

            path = aligned_projector_path()
        try:
            with _gathered(find_projector(model)):
                load_projector(model, path)
        except (KeyError, RuntimeError, ValueError) as err:
            raise ConfigError(f"model.projector: {path} does not match this model's projector: {err}") from None
    return model, processor


def build_datasets(config: TrainConfig, processor: Any, tasks: Sequence[str], seed: int) -> dict[str, Any]:
    from asymlora.data.collator import SampleEncoder, estimate_length
    from asymlora.data.mixture import load_mixture

    mixture = load_mixture(config.data.mixture)
    train_samples = mixture.load(split="train", seed=seed)
    if config.data.max_train_samples:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(train_samples), generator=generator)[: config.data.max_train_samples]
        train_samples = [train_samples[i] for i in sorted(keep.tolist())]
    encoder = SampleEncoder(processor, tasks=tasks, max_length=config.data.max_length)
    result: dict[str, Any] = {
        "mixture": mixture,
        "encoder": encoder,
        "train": EncodedDataset(train_samples, encoder),
        "weights": mixture.sampling_weights(train_samples),
        "lengths": [estimate_length(s, 64) for s in train_samples],
        "eval": None,
    }
    if config.data.eval_split:
        eval_samples = mixture.load(split=config.data.eval_split, seed=seed)
        if config.data.max_eval_samples:
            eval_samples = eval_samples[: config.data.max_eval_samples]
        result["eval"] = EncodedDataset(eval_samples, encoder) if eval_samples else None
    return result


def _set_up_processes(args: Any) -> None:
    """Start the process group before the model is built, and fill DeepSpeed's "auto" values for it.

    ZeRO-3 partitions the model while ``from_pretrained`` loads it, with the DeepSpeed config that
    ``TrainingArguments`` filled in when it was created, before any process group existed: with world
    size 1, so its ``train_batch_size`` is wrong under ``accelerate launch`` and zero.Init refuses it.
    """
    _ = args.device  # sets up the process group (accelerate's PartialState)
    if not args.deepspeed or args.world_size == 1:
        return
    import deepspeed
    import torch.distributed as dist
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    if dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)  # also what zero.Init reads
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


def _match_deepspeed_dtype(model: torch.nn.Module, args: Any) -> None:
    """Under DeepSpeed's bf16/fp16 modes every parameter trains in that dtype (the optimizer holds fp32
    master weights), and ZeRO-3 needs the trainable ones to share it: the float32 adapter (and routers)
    are moved to it here. ZeRO-3's partitioned parameters are already in it."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if not args.deepspeed or ds_config is None:
        return
    dtype = (torch.bfloat16 if ds_config.is_true("bf16.enabled")
             else torch.float16 if ds_config.is_true("fp16.enabled") else None)
    if dtype is None:
        return
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype \
                and getattr(param, "ds_id", None) is None:
            param.data = param.data.to(dtype)


def run_training(config: TrainConfig, resume: str | bool | None = None) -> Path:
    """Train as configured; returns the output dir holding the final adapter."""
    import transformers

    import asymlora
    from asymlora.data.collator import Collator
    from asymlora.data.mixture import load_mixture

    args = config.training_arguments()
    _set_up_processes(args)
    mixture_tasks = load_mixture(config.data.mixture).tasks
    adapter_config = config.adapter_config(mixture_tasks)
    base, processor = load_model_and_processor(config.model)
    # Seeded after loading: the adapter's initial values must not depend on how the base model was
    # loaded (ZeRO-3's zero.Init draws random numbers while loading, a plain load does not).
    transformers.set_seed(args.seed)
    model = asymlora.get_model(base, adapter_config)
    _match_deepspeed_dtype(model, args)
    data = build_datasets(config, processor, adapter_config.tasks, args.seed)
    tokenizer = getattr(processor, "tokenizer", processor)
    collator = Collator(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                        else tokenizer.eos_token_id)
    if args.eval_strategy != "no" and data["eval"] is None:
        raise ConfigError(f"{config.source}: training.eval_strategy={args.eval_strategy!r} needs data.eval_split")
    fsdp_requested = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if args.fsdp and args.parallel_mode.value != "distributed":
        raise ConfigError(f"{config.source}: training.fsdp: FSDP shards the model across processes; start this "
                          "under accelerate launch with 2 or more processes (on GPUs)")
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"], data_collator=collator,
        processing_class=processor, tasks=adapter_config.tasks, projector_lr=config.projector_lr,
        router_lr=config.router_lr, loraplus_lr_ratio=config.loraplus_lr_ratio, loss_average=config.loss_average,
        sampler_weights=data["weights"], sample_lengths=data["lengths"], num_samples=config.data.num_samples,
        group_by_length=config.data.group_by_length,
    )
    if fsdp_requested and not trainer.is_fsdp_enabled:
        # accelerate enables FSDP on GPU-like devices only; elsewhere it falls back to DDP without a word
        warnings.warn(f"{config.source}: FSDP was asked for (training.fsdp or accelerate's config) but accelerate "
                      f"enables it on GPUs only: this run on {args.device.type} is plain DDP, and every process "
                      "holds the whole model", stacklevel=2)
    if args.fp16 and not trainer.accelerator.native_amp and not trainer.is_deepspeed_enabled:
        # accelerate turns fp16 autocast and loss scaling on for GPU-like devices only, without a word
        warnings.warn(f"{config.source}: training.fp16 has no effect on {args.device.type}: accelerate runs "
                      "fp16 mixed precision on GPUs only, so this run trains in float32 (bf16 works on CPU)",
                      stacklevel=2)
    out = Path(args.output_dir)
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "train_config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        write_json_atomic(out / "param_report.json", asymlora.param_report(model))
    print(asymlora.format_param_report(asymlora.param_report(model)))
    resume = config.resume if resume is None else resume
    checkpoint = None
    if resume is True:
        found = last_checkpoint(out)
        checkpoint = None if found is None else str(found)
        if checkpoint is None:
            print(f"resume: no checkpoint in {out}; starting from scratch")
    elif resume:
        checkpoint = str(resume)
        if not Path(checkpoint).is_dir():
            raise ConfigError(f"resume: {checkpoint} is not a checkpoint directory")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(out))
    trainer.save_state()
    encoder = data["encoder"]
    if encoder.too_long:
        print(f"note: {encoder.too_long} sample(s) longer than data.max_length={config.data.max_length} could not be "
              f"cut after their image tokens and were skipped (e.g. {encoder.skipped_ids[:5]})")
    print(f"adapter saved to {out}")
    return out


def _end_processes(finished: bool) -> bool:
    """Tear down the process group this run started (under ``accelerate launch``), as PyTorch asks a run to;
    True when there was one.

    A finished run first waits for every rank, so that none tears the group down while another still uses
    it; a failed one does not wait (the other ranks may never get there).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if finished:
        dist.barrier()
    dist.destroy_process_group()
    return True


def _exit_without_teardown(code: int) -> None:
    """End a distributed rank now, skipping interpreter finalization (``os._exit``), once all is on disk.

    Even after ``destroy_process_group``, gloo's C++ worker threads can still hold finished work whose
    tensors reference Python objects (DeepSpeed and DDP keep their groups referenced); when the
    interpreter finalizes, freeing them needs the GIL and the rank aborts ("terminate called without an
    active exception", SIGABRT), failing a run that finished and saved everything (seen in CI under DDP
    and ZeRO-2/3). Every file this run writes is complete by now (atomic writes, the Trainer's callbacks
    closed at train end), so the rank flushes its logs and streams and leaves with its exit code.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _cli_train(args: argparse.Namespace) -> int:
    config = TrainConfig.load(args.config, args.overrides)
    finished, code = False, 1
    try:
        run_training(config, resume=args.resume)
        finished, code = True, 0
    except NonFiniteLossError as err:
        print(f"asymlora train: {err}")
    finally:
        ended = _end_processes(finished)
    if ended:  # a rank of a distributed run: leave before interpreter finalization (see above)
        _exit_without_teardown(code)
    return code


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train an adapter on a data mixture (HF Trainer; works under accelerate launch)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="training config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config values, e.g. training.max_steps=100 adapter.r=16")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="resume from the last checkpoint in output_dir, or from PATH")
    parser.set_defaults(func=_cli_train)
