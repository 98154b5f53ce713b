"""Attach asymlora layers to a Hugging Face model (:func:`get_model`, :func:`load`) and the wrapper
that routes each forward by task ids and collects the aux loss.

``get_model(model, config)`` replaces the target ``nn.Linear`` modules in place by
:class:`~asymlora.layer.AsymLoraLinear`, freezes everything else, makes ``modules_to_save``
trainable and returns an :class:`AsymLoraModel` whose ``forward`` takes ``task_ids`` (one id per
sample; every token of a sample inherits it) and which exposes ``aux_loss`` after each forward.

The balance loss is computed after the forward from the router tensors that the layers handed to
the shared :class:`~asymlora.routing.RoutingContext` during that forward. Those tensors carry their autograd graph,
so ``aux_loss`` keeps its gradient under non-reentrant gradient checkpointing (recomputation
happens in backward and re-runs exactly the same ops; nothing is collected then).

The wrapper's ``save_pretrained`` writes the adapter directory of :mod:`asymlora.persistence`, which
:func:`load` reads back; ``merge``, ``unmerge`` and ``export_peft`` are those of :mod:`asymlora.merge`.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asymlora.config import TORCH_DTYPES, AsymLoraConfig
from asymlora.errors import AsymLoraError, CheckpointError, ConfigError
from asymlora.families import Family, family_for, resolve_alias
from asymlora.layer import AsymLoraLinear
from asymlora.merge import merge_layers, unmerge_layers, write_peft_adapter
from asymlora.persistence import (
    CONFIG_NAME,
    adapter_manifest,
    check_base_model,
    check_layers,
    full_tensors,
    read_adapter_config,
    restore_tensors,
    write_adapter,
)
from asymlora.routing import RoutingContext, accumulate_routing_stats, balance_loss, group_records


class AsymLoraModel(nn.Module):
    """A Hugging Face model with asymlora layers. Attribute access falls through to the base model."""

    # transformers' mark of a model with trainable adapters attached: its Trainer refuses to train a quantized
    # base (QLoRA, asymlora.quantization) without it
    _hf_peft_config_loaded = True

    def __init__(self, base_model: nn.Module, config: AsymLoraConfig, family: Family,
                 layers: dict[str, AsymLoraLinear], saved_modules: list[str], context: RoutingContext) -> None:
        super().__init__()
        self.base_model = base_model
        self.asymlora_config = config
        self.family = family
        self.routing_context = context
        # Plain dict (not a ModuleDict) so each parameter is registered exactly once, under base_model.
        self.__dict__["adapter_layers"] = layers
        self.saved_modules = saved_modules
        self.aux_loss: torch.Tensor = torch.zeros(())
        # Routing statistics, stacked per group of layers that route the same tokens (see routing.RouterGroup).
        self._routing_totals: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------------------------ tasks
    @property
    def tasks(self) -> list[str]:
        return self.asymlora_config.tasks

    def task_ids_for(self, tasks: Sequence[str | int], device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor of task ids for task names (or ids); -1 stands for an unknown task."""
        ids = [t if isinstance(t, int) and t == -1 else self.asymlora_config.task_id(t) for t in tasks]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def _check_task_ids(self, task_ids: Any) -> torch.Tensor | None:
        if task_ids is None:
            return None
        if not isinstance(task_ids, torch.Tensor):
            task_ids = self.task_ids_for(list(task_ids))
        if task_ids.dim() != 1 or task_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise ConfigError(f"task_ids: expected a 1-D integer tensor (one id per sample), got {tuple(task_ids.shape)} "
                              f"{task_ids.dtype}")
        if task_ids.numel():
            low, high = torch.stack(torch.aminmax(task_ids)).tolist()  # one read from the device
            n = len(self.tasks)
            if n == 0:  # no task-dependent layer exists (task/hybrid routing require tasks): ids unused
                return None
            if high >= max(n, 1) or low < -1:
                raise ConfigError(f"task_ids: id {high if high >= n else low} is out of range for tasks {self.tasks!r} "
                                  f"(valid: -1 .. {n - 1})")
            if low == -1 and any(layer.spec.needs_task_ids for layer in self.adapter_layers.values()):
                raise ConfigError("task_ids: -1 (unknown task) is not allowed with routing='task'; "
                                  "use hybrid routing to fall back to the router for unknown tasks")
        return task_ids.long()

    def _token_mask(self, args: tuple, kwargs: dict, labels: torch.Tensor | None) -> torch.Tensor | None:
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        attention_mask = kwargs.get("attention_mask")
        labels = kwargs.get("labels") if labels is None else labels
        mask = attention_mask.bool() if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if isinstance(labels, torch.Tensor) and input_ids is not None and labels.shape == input_ids.shape:
            counted = labels != -100
            image_token = _image_token_id(self.base_model)
            if image_token is not None:
                counted = counted | (input_ids == image_token)
            mask = counted if mask is None else mask & counted
        return mask

    @contextlib.contextmanager
    def _routing_scope(self, task_ids: Any, token_mask: torch.Tensor | None, collect: bool) -> Iterator[None]:
        ctx = self.routing_context
        ctx.task_ids = self._check_task_ids(task_ids)
        ctx.token_task_cache = None  # a new forward: the ids may be the same tensor, changed in place
        ctx.token_mask = token_mask
        ctx.records = []
        ctx.collecting = collect
        try:
            yield
        finally:
            # task_ids and token_mask stay set: non-reentrant checkpointing re-runs layers in backward.
            ctx.collecting = False

    # ------------------------------------------------------------------------------------ forward
    def forward(self, *args: Any, task_ids: Any = None, routing_labels: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """The base model's forward with ``task_ids`` (LongTensor (B,)); sets ``self.aux_loss``.

        The balance loss counts the tokens that are supervised (``labels != -100``) or image tokens, padding
        excluded. ``routing_labels`` gives those labels without passing ``labels`` to the base model (for a
        caller that computes the LM loss itself).
        """
        ctx = self.routing_context
        token_mask = self._token_mask(args, kwargs, routing_labels)
        with self._routing_scope(task_ids, token_mask, collect=self.training or ctx.collect_stats):
            outputs = self.base_model(*args, **kwargs)
        self.aux_loss = self._balance_loss(outputs)
        return outputs

    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        """``base_model.generate`` with every step routed by ``task_ids``."""
        with self._routing_scope(task_ids, None, collect=False):
            return self.base_model.generate(*args, **kwargs)

    def _balance_loss(self, outputs: Any) -> torch.Tensor:
        """The summed balance loss of this forward's routed layers, one pass per group of layers that
        route the same tokens (typically every routed layer of the language model: a few kernels in all,
        not a dozen per layer)."""
        ctx = self.routing_context
        device = outputs.logits.device if hasattr(outputs, "logits") else torch.device("cpu")
        total = torch.zeros((), device=device)
        groups = group_records(ctx.records)
        ctx.records = []
        for group in groups:
            total = total + balance_loss(group.probs, group.dispatch, group.mask).to(device)
        if ctx.collect_stats:
            accumulate_routing_stats(self._routing_totals, groups, len(self.tasks))
        return total

    @contextlib.contextmanager
    def collect_routing_stats(self) -> Iterator[None]:
        """Within this block every forward adds to the routing statistics (read them with
        :meth:`pop_routing_stats`): per routed layer, the expert load (tokens per expert), the summed
        router entropy, the token count and the per-task load."""
        self.routing_context.collect_stats = True
        try:
            yield
        finally:
            self.routing_context.collect_stats = False

    @property
    def routing_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """The statistics accumulated so far, per routed layer: ``load`` (E,), ``entropy_sum``, ``tokens``
        and, with task ids, ``task_load`` (tasks, E)."""
        per_layer: dict[str, dict[str, torch.Tensor]] = {}
        for names, totals in self._routing_totals.items():
            for i, name in enumerate(names):
                entry = {key: value if key == "tokens" else value[i] for key, value in totals.items()}
                if name in per_layer:  # the layer also routed tokens of another shape (another group)
                    for key, value in entry.items():
                        per_layer[name][key] = per_layer[name][key] + value if key in per_layer[name] else value
                else:
                    per_layer[name] = entry
        return per_layer

    def pop_routing_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Return and reset the statistics accumulated since the last call."""
        stats = self.routing_stats
        self._routing_totals = {}
        return stats

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the frozen base model alone (adapters, not modules_to_save, are bypassed)."""
        self.routing_context.disabled = True
        try:
            yield
        finally:
            self.routing_context.disabled = False

    # ------------------------------------------------------------------------------------ parameters
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor this adapter trains: A and B banks, routers, task biases, modules_to_save, and
        anything else left with ``requires_grad``; keys are the base model's parameter names."""
        names = {}
        for name, param in self.base_model.named_parameters():
            owner = name.rsplit(".", 1)[0]
            is_adapter = owner in self.adapter_layers or owner.rsplit(".", 1)[0] in self.adapter_layers
            in_saved = any(name.startswith(prefix + ".") for prefix in self.saved_modules)
            if (is_adapter and "base_layer" not in name) or in_saved or param.requires_grad:
                names[name] = param
        return names

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, where ``strict`` allows the frozen base weights to be absent.

        An adapter checkpoint (asymlora's, or DeepSpeed's saved with ``exclude_frozen_parameters``) holds
        the trainable tensors only; every trainable tensor, and no unknown key, is still required.
        """
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if not strict:
            return result
        frozen = {name for name, param in self.named_parameters() if not param.requires_grad}
        missing = [key for key in result.missing_keys if key not in frozen]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"state_dict: missing trainable tensors {missing[:5]} ({len(missing)} in all), "
                                  f"unexpected keys {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})")
        return type(result)(missing, result.unexpected_keys)

    def save_pretrained(self, save_directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        is_main_process: bool = True, **_: Any) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically, file by file).

        Sharded parameters (FSDP2 / tensor-parallel ``DTensor``) are gathered to full tensors first: that
        is a collective, so under FSDP call this on every rank, with ``is_main_process`` true on one.
        ``state_dict``: an already gathered full state dict (what ``Trainer`` passes under FSDP's
        FULL_STATE_DICT or DeepSpeed ZeRO-3), keyed by this wrapper's or the base model's parameter
        names; every trainable tensor must be in it (a CheckpointError names the first missing one).
        """
        tensors = full_tensors(self.trainable_state_dict(), state_dict)
        if is_main_process:
            write_adapter(save_directory, tensors, self.adapter_manifest())

    def adapter_manifest(self) -> dict[str, Any]:
        """What ``adapter_config.json`` holds: the config, the base model and every adapted layer."""
        return adapter_manifest(self.asymlora_config, self.base_model, self.family, self.saved_modules,
                                self.adapter_layers)

    # ------------------------------------------------------------------------------------ merging
    def merge(self, task: str | int | None = None) -> None:
        """Fold W + s B_t A into every base weight. Raises NotImplementedError for router-gated layers."""
        merge_layers(self.adapter_layers.values(), self._task_id(task))

    def unmerge(self) -> None:
        """Restore the exact base weights."""
        unmerge_layers(self.adapter_layers.values())

    def export_peft(self, save_directory: str | Path, task: str | int | None = None) -> None:
        """Write a standard PEFT LoRA adapter reproducing this adapter for one task (A copied, B_t)."""
        base_config = getattr(self.base_model, "config", None)
        write_peft_adapter(save_directory, self.adapter_layers,
                           {name: self.base_model.get_submodule(name) for name in self.saved_modules},
                           self._task_id(task), getattr(base_config, "_name_or_path", None) or None)

    def _task_id(self, task: str | int | None) -> int | None:
        return None if task is None else self.asymlora_config.task_id(task)

    def param_report(self) -> dict[str, Any]:
        return param_report(self)


def _image_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


# ---------------------------------------------------------------------------------------- injection
def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def find_target_modules(model: nn.Module, config: AsymLoraConfig, family: Family | None = None) -> list[str]:
    """Names of the nn.Linear modules that ``config.target_modules`` selects (error if a name matches none)."""
    family = family or family_for(model)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear or (isinstance(m, nn.Linear)
               and not isinstance(m, AsymLoraLinear))]
    saved = [resolve_alias(family, s) for s in config.modules_to_save]
    linears = [n for n in linears if not any(n == s or n.startswith(s + ".") for s in saved)]
    in_parts = [n for n in linears if family.part_of(n) in config.target_parts and not _is_lm_head(n)]
    targets = config.target_modules
    if targets == "all-linear":
        found = in_parts
    elif isinstance(targets, str):
        found = [n for n in linears if re.fullmatch(targets, n)]
        if not found:
            raise ConfigError(f"target_modules: regex {targets!r} matches no nn.Linear module "
                              f"(e.g. {', '.join(linears[:3])})")
    else:
        found = []
        kinds = sorted({n.rsplit(".", 1)[-1] for n in in_parts})
        for target in targets:
            hits = [n for n in in_parts if n == target or n.endswith("." + target)]
            if not hits:
                raise ConfigError(
                    f"target_modules: {target!r} matches no nn.Linear in {config.target_parts} of this "
                    f"{family.name} model; available names: {kinds}"
                )
            found.extend(h for h in hits if h not in found)
        found.sort(key=in_parts.index)
    if not found and targets != []:
        raise ConfigError(f"target_modules: no nn.Linear found in target_parts {config.target_parts}")
    return found


def get_model(model: nn.Module, config: AsymLoraConfig) -> AsymLoraModel:
    """Inject asymlora layers into ``model`` in place, freeze the rest; returns the wrapper."""
    if isinstance(model, AsymLoraModel):
        raise AsymLoraError("get_model: the model already has asymlora layers")
    family = family_for(model)
    targets = find_target_modules(model, config, family)
    saved_modules = [resolve_alias(family, s) for s in config.modules_to_save]
    modules = dict(model.named_modules())
    for name in saved_modules:
        if name not in modules:
            raise ConfigError(f"modules_to_save: {name!r} is not a module of this {family.name} model")
    for param in model.parameters():
        param.requires_grad_(False)
    context = RoutingContext()
    layers: dict[str, AsymLoraLinear] = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = AsymLoraLinear(
            getattr(parent, child), config.spec_for(name), name=name, adapter_dtype=config.adapter_dtype,
            router_init_std=config.router_init_std, task_bias_init=config.task_bias_init,
            b_init_std=config.b_init_std,
        )
        layer.routing_context = context
        setattr(parent, child, layer)
        layers[name] = layer
    for layer in layers.values():
        for pname, param in layer.named_parameters():
            param.requires_grad_(not pname.startswith("base_layer."))
    for name in saved_modules:
        for param in modules[name].parameters():
            param.requires_grad_(True)
        if config.adapter_dtype != "auto":
            _train_in_dtype(modules[name], TORCH_DTYPES[config.adapter_dtype])
    return AsymLoraModel(model, config, family, layers, saved_modules, context)


def _cast_floats(value: Any, dtype: torch.dtype, found: list[torch.dtype] | None = None) -> Any:
    """``value`` with its floating-point tensors (also inside tuples, lists and dicts) cast to ``dtype``;
    their dtypes before the cast are appended to ``found``."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        if found is not None:
            found.append(value.dtype)
        return value.to(dtype)
    if type(value) in (tuple, list) or (isinstance(value, tuple) and hasattr(value, "_fields")):  # namedtuples
        cast = [_cast_floats(v, dtype, found) for v in value]
        return type(value)(*cast) if hasattr(value, "_fields") else type(value)(cast)
    if isinstance(value, dict):  # ModelOutput is an OrderedDict: set items in place, it keeps its type
        for key in list(value):
            value[key] = _cast_floats(value[key], dtype, found)
        return value
    return value


def _train_in_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Hold a trainable module_to_save in ``dtype`` (the adapter's, float32 by default) inside a model of
    another dtype: a bfloat16 projector would lose most AdamW steps of a small learning rate to rounding
    (2e-5 against a bf16 spacing of ~1e-4 at weights of 0.02), and fp16 loss scaling refuses fp16
    gradients. Its inputs are cast to its parameters' dtype and its outputs back to its inputs' dtype, so
    the model around it runs as before, with autocast or without. Parameters DeepSpeed has partitioned
    are left alone: DeepSpeed keeps their float32 master copy itself."""
    floats = [p for p in module.parameters() if p.is_floating_point()]
    if not floats or all(p.dtype == dtype for p in floats) or any(hasattr(p, "ds_id") for p in floats):
        return
    for param in floats:
        param.data = param.data.to(dtype)
    first = floats[0]  # read at call time: DeepSpeed's bf16/fp16 modes move the trainables again
    incoming: list[torch.dtype] = []

    def cast_inputs(_module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        incoming.clear()
        return _cast_floats(args, first.dtype, incoming), _cast_floats(kwargs, first.dtype, incoming)

    def cast_outputs(_module: nn.Module, _args: Any, output: Any) -> Any:
        return _cast_floats(output, incoming[0]) if incoming else output

    module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    module.register_forward_hook(cast_outputs)


def load(model: nn.Module, adapter_dir: str | Path, is_trainable: bool = True) -> AsymLoraModel:
    """Attach the adapter saved in ``adapter_dir`` to ``model`` and restore every tensor exactly.

    Refuses (CheckpointError) a directory whose target modules or tensor shapes differ from the model's.
    """
    config, manifest = read_adapter_config(adapter_dir)
    if isinstance(model, AsymLoraModel):
        wrapped = model
    else:
        try:
            wrapped = get_model(model, config)
        except ConfigError as err:
            raise CheckpointError(f"{Path(adapter_dir) / CONFIG_NAME}: this adapter does not fit the model: "
                                  f"{err}") from None
    current = wrapped.adapter_manifest()
    check_layers(adapter_dir, manifest.get("layers", {}), current["layers"])
    check_base_model(adapter_dir, manifest.get("base_model") or {}, current["base_model"])
    restore_tensors(adapter_dir, wrapped.trainable_state_dict())
    if not is_trainable:
        for param in wrapped.parameters():
            param.requires_grad_(False)
    return wrapped


# ---------------------------------------------------------------------------------------- export
def export_peft(model: AsymLoraModel, save_directory: str | Path, task: str | int | None = None) -> None:
    """Write a PEFT LoRA adapter (A copied, B_t) for one task; loadable by ``PeftModel.from_pretrained``."""
    model.export_peft(save_directory, task)


# ---------------------------------------------------------------------------------------- report
def param_report(model: AsymLoraModel) -> dict[str, Any]:
    """Trainable parameters by role (A, B, router, task bias, modules_to_save) and by module kind."""
    by_role: dict[str, int] = defaultdict(int)
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_method: dict[str, int] = defaultdict(int)
    for name, layer in model.adapter_layers.items():
        kind = name.rsplit(".", 1)[-1]
        part = model.family.part_of(name) or "other"
        for pname, param in layer.named_parameters():
            if pname.startswith("base_layer."):
                continue
            role = pname.split(".")[0]
            by_role[role] += param.numel()
            by_kind[f"{part}.{kind}"][role] += param.numel()
            by_method[layer.spec.method] += param.numel()
    saved = sum(p.numel() for n in model.saved_modules for p in model.base_model.get_submodule(n).parameters())
    if saved:
        by_role["modules_to_save"] = saved
    trainable = sum(v.numel() for v in model.trainable_state_dict().values())
    total = sum(p.numel() for p in model.base_model.parameters())
    return {
        "trainable": trainable,
        "total": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "by_role": dict(by_role),
        "by_method": dict(by_method),
        "by_module_kind": {k: dict(v) for k, v in by_kind.items()},
        "layers": len(model.adapter_layers),
    }


def format_param_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`param_report`."""
    lines = [f"trainable {report['trainable']:,} of {report['total']:,} ({report['trainable_percent']:.3f}%) "
             f"in {report['layers']} adapted layers"]
    lines += [f"  {role:16s} {n:>12,}" for role, n in report["by_role"].items()]
    lines.append("by method:")
    lines += [f"  {m:16s} {n:>12,}" for m, n in report["by_method"].items()]
    lines.append("by module kind:")
    for kind, roles in report["by_module_kind"].items():
        lines.append(f"  {kind:32s} " + "  ".join(f"{r}={n:,}" for r, n in roles.items()))
    return "\n".join(lines)
