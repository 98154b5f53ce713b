"""`asymlora analyze`: task-conflict analysis of an adapter (gradient cosines, expert load, routing entropy).

For each task t of a mixture, the gradient g_t of that task's LM loss (the training loss: mean cross
entropy over the supervised answer tokens of N samples of t; the balance loss is left out) is taken with
respect to the adapter's A and B banks, with dropout off. The gradients of every pair of tasks are then
compared by cosine similarity, cos(g_t, g_u) = <g_t, g_u> / (|g_t| |g_u|), over several parameter groups:

- ``A``: every ``A_bank`` of every adapted layer, flattened into one vector (for lora_moe, whose A_bank
  holds the E down-projections A_1..A_E, all of them). The shared A of asymlora is where tasks can
  interfere: a negative cosine means one task's descent direction increases the other task's loss.
- ``B``: every ``B_bank`` (all E heads). With task routing (asymlora), task t's tokens only reach head
  B_t, so the B gradients of two tasks lie on disjoint heads and their cosine is 0 **by construction**;
  it says nothing about conflict. With a router it measures how much the tasks share heads *and* agree.
- ``B_heads_summed``: the B gradient summed over the E heads, i.e. the gradient with respect to a
  component added to every head (B_e = B_shared + D_e). It is head-agnostic, so it is comparable across
  methods: it shows how much two tasks would conflict on a single shared B (as plain LoRA has).
- ``B_per_expert`` (E > 1): the cosine restricted to head e, for each e.

Cosines over a group use the sum of the per-layer inner products, so every layer counts by its number of
parameters; ``per_layer`` gives the mean off-diagonal cosine (over task pairs) of each layer alone. A
gradient that is exactly zero has no direction: its cosines are NaN (``null`` in JSON), e.g. the A
gradient of a freshly initialised adapter (``--config``), whose B is zero.

For routed methods (dense / topk / hybrid routers: asymlora_moe, lora_moe), the forward passes also
collect, per task and per routed layer, the **expert load** (share of routing slots each expert gets: the
argmax for dense and hybrid, the k chosen ones for topk; rows sum to 1) and the mean **router entropy**
(nats; at most ln E), over the tokens that the balance loss counts (supervised answer tokens and image
tokens, padding and prompt text excluded). Task routing (asymlora) has no router: head t serves task t.

Outputs in ``--out``: ``analysis.json`` (every matrix, the tasks, the method, the samples),
``analysis.md`` (tables), ``grad_cosine.png``, and for routed adapters ``expert_load.png`` and
``routing_entropy.png``. See docs/analysis.md.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asymlora.analyze.experts import expert_similarity, routing_summary
from asymlora.analyze.gradients import gradient_conflict, task_pass
from asymlora.analyze.report import write_outputs
from asymlora.data.collator import Collator, SampleEncoder
from asymlora.data.mixture import load_mixture
from asymlora.errors import ConfigError
from asymlora.evaluate.run import load_for_eval, trained_config
from asymlora.loading import load_model_and_processor
from asymlora.model import get_model
from asymlora.persistence import CONFIG_NAME
from asymlora.train import TrainConfig


# ---------------------------------------------------------------------------------------------- loading
def _enable_adapter_grads(model: Any) -> None:
    """Only the A and B banks need gradients (routers, task biases and modules_to_save stay frozen)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in model.adapter_layers.values():
        layer.A_bank.requires_grad_(True)
        layer.B_bank.requires_grad_(True)


def load_for_analysis(adapter: str | None = None, config: str | None = None, model: str | None = None,
                      dtype: str = "float32", quantization: Any = "auto") -> tuple[Any, Any, dict[str, Any]]:
    """(adapter model in eval mode with A/B gradients on, processor, settings read from the training config).
    ``quantization``: ``"auto"`` (the training config's model.quantization), None (a float base) or an
    :mod:`asymlora.quantization` option.

    ``adapter``: a dir written by ``asymlora train``, or one of its ``checkpoint-N`` dirs (base model,
    projector and mixture from the run's train_config.yaml; loaded by
    :func:`asymlora.evaluate.run.load_for_eval`). ``config``: a training config; the adapter is freshly
    initialised with the config's seed (its B banks are zero, so its A gradients are zero). ``model``: a model
    name ('default', 'tiny') or a local dir; None takes the training config's.
    """
    if bool(adapter) == bool(config):
        raise ConfigError("give exactly one of --adapter (a trained adapter dir) or --config (a training config)")
    trained: dict[str, Any] = {}
    if adapter:
        if not (Path(adapter) / CONFIG_NAME).is_file():
            raise ConfigError(f"--adapter: {adapter} is not an asymlora adapter dir (no {CONFIG_NAME})")
        trained = trained_config(adapter)  # the base model and projector come from it in load_for_eval too
        wrapped, processor, _ = load_for_eval(model=model, adapter=adapter, dtype=dtype, quantization=quantization)
    else:
        train_config = TrainConfig.load(config)  # type: ignore[arg-type]
        trained = train_config.to_dict()
        base, processor = load_model_and_processor(model or train_config.model.path,
                                                   dtype, train_config.model.projector,
                                                   train_config.model.quantization if quantization == "auto"
                                                   else quantization)
        adapter_config = train_config.adapter_config(load_mixture(train_config.data.mixture).tasks)
        torch.manual_seed(int(train_config.training.get("seed", 42)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        wrapped = get_model(base, adapter_config).to(device).eval()
    if not getattr(wrapped, "adapter_layers", None):
        raise ConfigError(f"{'--adapter' if adapter else '--config'}: this adapter has no adapted layers (only "
                          "modules_to_save); there are no A/B gradients to analyse")
    _enable_adapter_grads(wrapped)
    return wrapped, processor, trained


def select_samples(mixture: Any, tasks: Sequence[str], split: str | None, seed: int = 0) -> tuple[str, dict[str, list[Any]]]:
    """(split used, each task's samples in a seeded random order).

    The caller encodes them in that order and keeps the first N that fit ``max_length``.
    ``split=None``: ``val`` when every task has validation samples, else ``train``.
    """
    chosen_split = split or "val"
    samples = mixture.load(split=chosen_split, seed=seed)
    if split is None and any(not any(s.task == t for s in samples) for t in tasks):
        chosen_split = "train"
        samples = mixture.load(split=chosen_split, seed=seed)
    by_task: dict[str, list[Any]] = {}
    for task in tasks:
        rows = [s for s in samples if s.task == task]
        if not rows:
            raise ConfigError(f"--split: mixture {mixture.name!r} has no {chosen_split} samples of task {task!r}")
        order = list(range(len(rows)))
        random.Random(f"{seed}:{task}:{chosen_split}").shuffle(order)
        by_task[task] = [rows[i] for i in order]  # encoding may skip some; the caller takes the first N
    return chosen_split, by_task


def _encode(samples: Sequence[Any], encoder: Any, limit: int) -> list[dict[str, Any]]:
    items = []
    for sample in samples:
        if len(items) == limit:
            break
        item = encoder(sample)
        if item is not None:
            items.append(item)
    return items


# ---------------------------------------------------------------------------------------------- driver
def _notes(spec: Any) -> list[str]:
    notes = []
    if spec.routing == "task" and spec.num_experts > 1:
        notes.append("Task routing: task t's tokens reach only head B_t, so the B gradients of two tasks lie on "
                     "disjoint heads and their B cosine is 0 by construction. Compare tasks on the shared A and "
                     "on B_heads_summed (the gradient of a component shared by all heads).")
    if spec.num_experts == 1:
        notes.append("One B head (lora): B and B_heads_summed are the same matrix.")
    if spec.method == "lora_moe":
        notes.append("lora_moe: A holds the E down-projections A_1..A_E together; with a router, tasks that "
                     "use different experts have near-orthogonal A and B gradients.")
    if spec.has_router:
        notes.append("Routed heads: the B cosine mixes how much two tasks share experts with how much they "
                     "agree; see B_per_expert and the expert load.")
    return notes


def analyze(model: Any, processor: Any, mixture: Any, tasks: Sequence[str] | None = None,
            split: str | None = None, samples_per_task: int = 32, batch_size: int = 4, max_length: int = 1024,
            seed: int = 0) -> dict[str, Any]:
    """Run the analysis on an adapter model (from :func:`load_for_analysis`); returns the result mapping
    written to ``analysis.json``."""
    if samples_per_task < 1:
        raise ConfigError(f"--samples-per-task: must be >= 1, got {samples_per_task}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    adapter_tasks = list(model.tasks)
    if tasks:
        unknown = [t for t in tasks if t not in mixture.tasks]
        if unknown:
            raise ConfigError(f"--tasks: {unknown} are not tasks of mixture {mixture.name!r} ({mixture.tasks})")
        tasks = list(tasks)
    else:
        tasks = [t for t in mixture.tasks if not adapter_tasks or t in adapter_tasks]
    foreign = [t for t in tasks if adapter_tasks and t not in adapter_tasks]
    if foreign:
        raise ConfigError(f"--tasks: {foreign} are not tasks of the adapter ({adapter_tasks})")
    if not tasks:
        raise ConfigError(f"--mixture: mixture {mixture.name!r} shares no task with the adapter ({adapter_tasks})")
    chosen_split, by_task = select_samples(mixture, tasks, split, seed)
    encoder = SampleEncoder(processor, tasks=adapter_tasks, max_length=max_length)
    tokenizer = getattr(processor, "tokenizer", processor)
    collator = Collator(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                        else tokenizer.eos_token_id)
    passes, samples = [], {}
    for task in tasks:
        items = _encode(by_task[task], encoder, samples_per_task)
        if not items:
            raise ConfigError(f"--max-length: every {chosen_split} sample of task {task!r} is longer than "
                              f"{max_length} tokens")
        samples[task] = len(items)
        passes.append(task_pass(model, items, collator, batch_size))
    spec = model.asymlora_config.layer_spec()
    return {
        "method": spec.method, "routing": spec.routing, "num_experts": spec.num_experts, "r": spec.r,
        "mixture": mixture.name, "split": chosen_split, "tasks": list(tasks), "samples": samples,
        "tokens": {t: p["tokens"] for t, p in zip(tasks, passes)},
        "loss": {t: p["loss"] for t, p in zip(tasks, passes)},
        "layers": len(model.adapter_layers), "seed": seed,
        "gradient": gradient_conflict(passes), "routing_stats": routing_summary(passes),
        "expert_similarity": expert_similarity(model),
        "notes": _notes(spec),
    }


def run_analysis(out: str | Path, adapter: str | None = None, config: str | None = None, model: str | None = None,
                 mixture: str | None = None, tasks: Sequence[str] | None = None, split: str | None = None,
                 samples_per_task: int = 32, batch_size: int = 4, max_length: int | None = None, seed: int = 0,
                 dtype: str = "float32", quantization: Any = "auto") -> dict[str, Any]:
    """Load, analyse and write ``analysis.json``, ``analysis.md`` and the plots into ``out``
    (``quantization``: as :func:`load_for_analysis`'s)."""
    if samples_per_task < 1:
        raise ConfigError(f"--samples-per-task: must be >= 1, got {samples_per_task}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if split is not None and split not in ("train", "val", "test"):
        raise ConfigError(f"--split: {split!r} is not one of ('train', 'val', 'test')")
    wrapped, processor, trained = load_for_analysis(adapter, config, model, dtype, quantization)
    data = trained.get("data") or {}
    loaded = load_mixture(mixture or data.get("mixture") or "mix5")
    result = analyze(wrapped, processor, loaded, tasks=tasks, split=split, samples_per_task=samples_per_task,
                     batch_size=batch_size, max_length=max_length or int(data.get("max_length") or 1024), seed=seed)
    result = {"adapter": str(adapter) if adapter else None, "config": str(config) if config else None, **result}
    write_outputs(result, Path(out))
    return result


# ---------------------------------------------------------------------------------------------- CLI
