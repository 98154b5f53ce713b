"""`AsymLoraTrainer`: HF Trainer with asymlora's optimizer groups, loss, per-task logging and checkpoints."""

from __future__ import annotations

import inspect
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from asymlora.errors import NonFiniteLossError
from asymlora.io import atomic_path, write_text_atomic
from asymlora.model import load
from asymlora.persistence import full_tensors
from asymlora.train.checkpoints import RUN_CONFIG_NAME, TRAINER_STATE_NAME, last_checkpoint, run_config_text
from asymlora.train.dataset import MixtureSampler
from asymlora.train.loss import next_token_loss


class AsymLoraTrainer(Trainer):
    """HF Trainer with the asymlora loss, per-task logging, adapter checkpoints and mixture sampling."""

    def __init__(self, *args: Any, tasks: Sequence[str] = (), projector_lr: float | None = None,
                 router_lr: float | None = None, loraplus_lr_ratio: float | None = None,
                 loss_average: str = "tokens",
                 sampler_weights: Sequence[float] | None = None, sample_lengths: Sequence[int] | None = None,
                 num_samples: int | None = None, group_by_length: bool = False,
                 run_config: dict[str, Any] | None = None, on_first_step: Callable[[], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_config = run_config  # recorded in every checkpoint (train_config.yaml)
        self.first_step = FirstStepCallback(on_first_step)
        self.add_callback(self.first_step)
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
            self._stop_non_finite(f"the training loss is {loss.item()} at step {self.state.global_step + 1}")
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # The Trainer calls this after backward (and clipping) and before optimizer.step: the last moment to
        # keep a non-finite gradient out of the weights. The norm is global (DDP, FSDP), so every rank
        # stops alike. Under fp16 loss scaling a non-finite norm is routine: the scaler skips that step.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        scaled = self.accelerator.scaler is not None or (self.is_deepspeed_enabled and self.args.fp16)
        if grad_norm is not None and not scaled and not math.isfinite(float(grad_norm)):
            self._stop_non_finite(f"the gradient norm is {float(grad_norm)} at step {self.state.global_step + 1} "
                                  "(the update was not applied)")
        return grad_norm

    def _stop_non_finite(self, what: str) -> None:
        last = last_checkpoint(self.args.output_dir, config=self.run_config, optimizer=not self.args.save_only_model)
        raise NonFiniteLossError(
            f"{what}; training stopped. The newest checkpoint whose tensors are all finite is "
            f"{last or 'none (no such checkpoint was saved)'}; lower training.learning_rate and train again "
            "(a changed config is a new run: another training.output_dir, or replace_run: true)."
        )

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
        # Every file is written atomically, the config the run was started with included (resume takes only
        # checkpoints of the same config); a tensor that is NaN or inf stops the run before anything is written.
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        tensors = full_tensors(self.adapter_model.trainable_state_dict(), state_dict)
        finite = torch.stack([t.isfinite().all() for t in tensors.values()]) if tensors else torch.ones(1, dtype=torch.bool)
        if not finite.all():
            name = list(tensors)[int((~finite).nonzero()[0])]
            self._stop_non_finite(f"the trainable tensor {name} holds NaN or inf after step {self.state.global_step}, "
                                  f"so {output_dir} was not written")
        os.makedirs(output_dir, exist_ok=True)
        self.adapter_model.save_pretrained(output_dir, state_dict=tensors)
        if self.processing_class is not None:
            _save_processor_atomically(self.processing_class, Path(output_dir))
        if self.run_config is not None:
            write_text_atomic(Path(output_dir) / RUN_CONFIG_NAME, run_config_text(self.run_config))

    def save_state(self) -> None:
        """``trainer_state.json`` of the output dir, written atomically (the Trainer's own write is not)."""
        if self.is_world_process_zero():
            with atomic_path(Path(self.args.output_dir) / TRAINER_STATE_NAME) as tmp:
                self.state.save_to_json(str(tmp))

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
        load(self.adapter_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            load(self.adapter_model, self.state.best_model_checkpoint)


class FirstStepCallback(TrainerCallback):
    """Calls ``action`` once, when this process's first optimizer step is done; ``done`` says whether it was."""

    def __init__(self, action: Callable[[], None] | None = None) -> None:
        self.action = action
        self.done = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.done:
            self.done = True
            if self.action is not None:
                self.action()


def _save_processor_atomically(processor: Any, output_dir: Path) -> None:
    """``processor.save_pretrained`` into a temporary dir beside the files, then each file renamed into place;
    the temporary dirs of an earlier save that was killed are removed first."""
    for stale in output_dir.glob(".processor-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=".processor-", dir=output_dir) as tmp:
        processor.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            target = output_dir / path.relative_to(tmp)
            if path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(path, target)
