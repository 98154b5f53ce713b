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

import argparse
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asymlora.errors import ConfigError

GROUPS = ("A", "B", "B_heads_summed")


# ---------------------------------------------------------------------------------------------- cosines
def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix ``G[t, u] = <g_t, g_u>``: ``G[t, u] / sqrt(G[t, t] G[u, u])``.

    Entries involving a zero vector are NaN; values are clamped to [-1, 1] (rounding).
    """
    gram = gram.double()
    norms = gram.diagonal().clamp(min=0).sqrt()
    denominator = norms.unsqueeze(0) * norms.unsqueeze(1)
    cosine = torch.where(denominator > 0, gram / denominator.clamp(min=1e-300),
                         torch.full_like(gram, float("nan")))
    return cosine.clamp(-1.0, 1.0)


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """T x T cosine similarities between the rows of ``vectors`` (T, P) (NaN for a zero row)."""
    flat = vectors.reshape(vectors.shape[0], -1).double()
    return cosine_from_gram(flat @ flat.T)


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the finite off-diagonal entries (NaN when there is none, e.g. a single task)."""
    size = matrix.shape[0]
    off = matrix[~torch.eye(size, dtype=torch.bool)]
    off = off[torch.isfinite(off)]
    return float(off.mean()) if off.numel() else float("nan")


# ---------------------------------------------------------------------------------------------- loading
def _enable_adapter_grads(model: Any) -> None:
    """Only the A and B banks need gradients (routers, task biases and modules_to_save stay frozen)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in model.adapter_layers.values():
        layer.A_bank.requires_grad_(True)
        layer.B_bank.requires_grad_(True)


def load_for_analysis(adapter: str | None = None, config: str | None = None, model: str = "default",
                      dtype: str = "float32") -> tuple[Any, Any, dict[str, Any]]:
    """(adapter model in eval mode with A/B gradients on, processor, settings read from the training config).

    ``adapter``: a dir written by ``asymlora train``, or one of its ``checkpoint-N`` dirs (base model,
    projector and mixture from the run's train_config.yaml; loaded by
    :func:`asymlora.evaluate.run.load_for_eval`). ``config``: a training config; the adapter is freshly
    initialised with the config's seed (its B banks are zero, so its A gradients are zero).
    """
    if bool(adapter) == bool(config):
        raise ConfigError("give exactly one of --adapter (a trained adapter dir) or --config (a training config)")
    trained: dict[str, Any] = {}
    if adapter:
        from asymlora.evaluate.run import load_for_eval, trained_config
        from asymlora.persistence import CONFIG_NAME

        if not (Path(adapter) / CONFIG_NAME).is_file():
            raise ConfigError(f"--adapter: {adapter} is not an asymlora adapter dir (no {CONFIG_NAME})")
        trained = trained_config(adapter)  # the base model and projector come from it in load_for_eval too
        wrapped, processor, _ = load_for_eval(model=model, adapter=adapter, dtype=dtype)
    else:
        import asymlora
        from asymlora.data.mixture import load_mixture
        from asymlora.train import ModelSection, TrainConfig, load_model_and_processor

        train_config = TrainConfig.load(config)  # type: ignore[arg-type]
        trained = train_config.to_dict()
        section = ModelSection(path=model if model != "default" else train_config.model.path, dtype=dtype,
                               projector=train_config.model.projector)
        base, processor = load_model_and_processor(section)
        adapter_config = train_config.adapter_config(load_mixture(train_config.data.mixture).tasks)
        torch.manual_seed(int(train_config.training.get("seed", 42)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        wrapped = asymlora.get_model(base, adapter_config).to(device).eval()
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


# ---------------------------------------------------------------------------------------------- gradients
def task_pass(model: Any, items: Sequence[dict[str, Any]], collator: Any, batch_size: int) -> dict[str, Any]:
    """Gradient of one task's mean LM loss over ``items`` (encoded samples), and its routing statistics.

    Returns ``loss`` (float), ``tokens`` (supervised tokens), ``A`` and ``B`` (layer name -> gradient on the
    CPU, float32; A: (n_A*r, d_in), B: (E, d_out, r)) and ``routing`` (the layer statistics of
    :meth:`asymlora.model.AsymLoraModel.collect_routing_stats`).
    """
    device = next(p for p in model.parameters() if p.requires_grad).device
    tokens = sum(int((item["labels"][1:] != -100).sum()) for item in items)
    if tokens == 0:
        raise ConfigError("the chosen samples have no supervised (answer) token; nothing to take a gradient of")
    model.zero_grad(set_to_none=True)
    model.pop_routing_stats()
    from asymlora.train import next_token_loss

    total = 0.0
    with model.collect_routing_stats():
        for start in range(0, len(items), batch_size):
            batch = collator(items[start:start + batch_size])
            labels = batch.pop("labels").to(device)
            task_ids = batch.pop("task_ids").to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            outputs = model(**inputs, task_ids=task_ids, routing_labels=labels)
            loss = next_token_loss(outputs.logits, labels)[0].sum() / tokens
            loss.backward()
            total += float(loss.detach())
    stats = model.pop_routing_stats()
    grads: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}}
    for name, layer in model.adapter_layers.items():
        for group, param in (("A", layer.A_bank), ("B", layer.B_bank)):
            grad = param.grad
            grads[group][name] = (torch.zeros(param.shape) if grad is None
                                  else grad.detach().float().cpu().clone())
    model.zero_grad(set_to_none=True)
    return {"loss": total, "tokens": tokens, **grads, "routing": stats}


def gradient_conflict(passes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cosine matrices between the tasks' gradients (see the module docstring for the groups).

    ``passes``: one :func:`task_pass` result per task, in task order.
    """
    layers = list(passes[0]["A"])
    size = len(passes)
    experts = max(p.shape[0] for p in passes[0]["B"].values())
    grams = {group: torch.zeros(size, size, dtype=torch.float64) for group in GROUPS}
    expert_grams = [torch.zeros(size, size, dtype=torch.float64) for _ in range(experts)]
    per_layer = []
    for name in layers:
        a = torch.stack([p["A"][name].reshape(-1) for p in passes]).double()
        b = torch.stack([p["B"][name] for p in passes]).double()  # (T, E, d_out, r)
        b = b.reshape(size, b.shape[1], -1)
        layer_grams = {"A": a @ a.T, "B": torch.einsum("tep,uep->tu", b, b)}
        summed = b.sum(1)
        layer_grams["B_heads_summed"] = summed @ summed.T
        for e in range(b.shape[1]):
            expert_grams[e] += b[:, e] @ b[:, e].T
        entry: dict[str, Any] = {"layer": name}
        for group in GROUPS:
            grams[group] += layer_grams[group]
            entry[group] = mean_off_diagonal(cosine_from_gram(layer_grams[group]))
        per_layer.append(entry)
    result: dict[str, Any] = {}
    for group in GROUPS:
        cosine = cosine_from_gram(grams[group])
        result[group] = {"cosine": cosine.tolist(), "norm": grams[group].diagonal().sqrt().tolist(),
                         "mean_off_diagonal": mean_off_diagonal(cosine)}
    result["B_per_expert"] = [] if experts == 1 else [
        {"expert": e, "cosine": cosine.tolist(), "norm": g.diagonal().sqrt().tolist(),
         "mean_off_diagonal": mean_off_diagonal(cosine)}
        for e, g in enumerate(expert_grams) for cosine in [cosine_from_gram(g)]
    ]
    result["per_layer"] = per_layer
    return result


def task_expert_information(loads: Sequence[Sequence[float]]) -> float:
    """Mutual information (nats) between the task (each row equally likely) and the expert a routing slot
    goes to, from one layer's per-task expert load (T x E, rows sum to 1). 0 when every task routes alike;
    at most ln(min(T, E)), reached when each task has experts of its own."""
    tasks, experts = len(loads), len(loads[0])
    marginal = [sum(row[e] for row in loads) / tasks for e in range(experts)]
    return sum(row[e] * math.log(row[e] / marginal[e]) for row in loads for e in range(experts) if row[e] > 0) / tasks


def routing_summary(passes: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-task expert load (T x E, rows sum to 1; averaged over routed layers with the most common E)
    and router entropy per layer; None when no layer has a router."""
    names = [n for n in passes[0]["routing"]]
    if not names:
        return None
    counts: dict[int, int] = {}
    for name in names:
        e = int(passes[0]["routing"][name]["load"].numel())
        counts[e] = counts.get(e, 0) + 1
    experts = max(counts, key=lambda e: (counts[e], e))
    per_layer_load: dict[str, list[list[float]]] = {}
    per_layer_entropy: dict[str, list[float | None]] = {}
    for name in names:
        loads, entropies = [], []
        for p in passes:
            entry = p["routing"].get(name)
            if entry is None or float(entry["tokens"]) == 0:
                loads.append(None)
                entropies.append(None)
                continue
            load = entry["load"].double().cpu()
            loads.append((load / load.sum().clamp(min=1e-12)).tolist())
            entropies.append(float(entry["entropy_sum"]) / float(entry["tokens"]))
        per_layer_load[name] = loads
        per_layer_entropy[name] = entropies
    mean_load = []
    for t in range(len(passes)):
        rows = [torch.tensor(per_layer_load[n][t], dtype=torch.float64) for n in names
                if per_layer_load[n][t] is not None and len(per_layer_load[n][t]) == experts]
        mean_load.append((torch.stack(rows).mean(0)).tolist() if rows else [float("nan")] * experts)
    mean_entropy = []
    for t in range(len(passes)):
        values = [per_layer_entropy[n][t] for n in names if per_layer_entropy[n][t] is not None]
        mean_entropy.append(sum(values) / len(values) if values else float("nan"))
    information = {n: task_expert_information(per_layer_load[n]) for n in names
                   if all(row is not None for row in per_layer_load[n])}
    return {"num_experts": experts, "layers": len(names), "expert_load": mean_load,
            "expert_load_per_layer": per_layer_load, "entropy": mean_entropy,
            "entropy_per_layer": per_layer_entropy, "max_entropy": math.log(experts),
            "task_expert_mi_per_layer": information,
            "task_expert_mi": sum(information.values()) / len(information) if information else float("nan"),
            "max_task_expert_mi": math.log(min(len(passes), experts))}


def expert_similarity(model: Any) -> dict[str, Any] | None:
    """How alike a layer's experts are: the mean pairwise cosine between their updates dW_e = B_e A_(e)
    (Frobenius inner products, from r x r Gram matrices: <B_e A_e, B_f A_f> = tr(B_e^T B_f A_f A_e^T)).
    1 = the experts compute one update, whatever the router does; None when no layer has E >= 2."""
    per_layer: dict[str, float] = {}
    for name, layer in model.adapter_layers.items():
        spec = layer.spec
        if spec.num_experts < 2:
            continue
        with torch.no_grad():
            B = layer.B_bank.detach().double().cpu()  # (E, d_out, r)
            A = layer.A_bank.detach().double().cpu().view(spec.num_A, spec.r, -1)  # (n_A, r, d_in)
            A = A.expand(spec.num_experts, -1, -1) if spec.num_A == 1 else A
            gram_B = torch.einsum("eor,fos->efrs", B, B)
            gram_A = torch.einsum("fsi,eri->efsr", A, A)  # A_f A_e^T
            gram = torch.einsum("efrs,efsr->ef", gram_B, gram_A)
        cosine = cosine_from_gram(gram)
        per_layer[name] = mean_off_diagonal(cosine)
    if not per_layer:
        return None
    finite = [v for v in per_layer.values() if math.isfinite(v)]
    return {"per_layer": per_layer, "mean": sum(finite) / len(finite) if finite else float("nan")}


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
    from asymlora.data.collator import Collator, SampleEncoder

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


def run_analysis(out: str | Path, adapter: str | None = None, config: str | None = None, model: str = "default",
                 mixture: str | None = None, tasks: Sequence[str] | None = None, split: str | None = None,
                 samples_per_task: int = 32, batch_size: int = 4, max_length: int | None = None, seed: int = 0,
                 dtype: str = "float32") -> dict[str, Any]:
    """Load, analyse and write ``analysis.json``, ``analysis.md`` and the plots into ``out``."""
    from asymlora.data.mixture import load_mixture

    if samples_per_task < 1:
        raise ConfigError(f"--samples-per-task: must be >= 1, got {samples_per_task}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if split is not None and split not in ("train", "val", "test"):
        raise ConfigError(f"--split: {split!r} is not one of ('train', 'val', 'test')")
    wrapped, processor, trained = load_for_analysis(adapter, config, model, dtype)
    data = trained.get("data") or {}
    loaded = load_mixture(mixture or data.get("mixture") or "mix5")
    result = analyze(wrapped, processor, loaded, tasks=tasks, split=split, samples_per_task=samples_per_task,
                     batch_size=batch_size, max_length=max_length or int(data.get("max_length") or 1024), seed=seed)
    result = {"adapter": str(adapter) if adapter else None, "config": str(config) if config else None, **result}
    write_outputs(result, Path(out))
    return result


# ---------------------------------------------------------------------------------------------- outputs
def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _matrix_table(labels: Sequence[str], columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| **{label}** | " + " | ".join(_fmt(v) for v in row) + " |" for label, row in zip(labels, rows)]
    return "\n".join(lines)


GROUP_TITLES = {
    "A": "shared A (all A_bank parameters)",
    "B": "B (all heads; 0 off the diagonal by construction under task routing)",
    "B_heads_summed": "B summed over heads (head-agnostic)",
}


def markdown_report(result: dict[str, Any]) -> str:
    """``analysis.md``: setup, the cosine matrices, the per-layer summary and the routing tables."""
    tasks = result["tasks"]
    grad = result["gradient"]
    source = result.get("adapter") or result.get("config") or "?"
    parts = [f"# Task-conflict analysis: {source}", "",
             f"method **{result['method']}** (routing {result['routing']}, E={result['num_experts']}, "
             f"r={result['r']}, {result['layers']} adapted layers); mixture {result['mixture']}, split "
             f"{result['split']}; samples per task: "
             + ", ".join(f"{t} {result['samples'][t]} ({result['tokens'][t]} tokens)" for t in tasks), ""]
    parts += [f"- {note}" for note in result["notes"]]
    parts += ["", "Gradient of each task's mean LM loss; cosine similarity between tasks (1 = same direction, "
              "0 = orthogonal, < 0 = conflict; n/a = zero gradient).", ""]
    for group in GROUPS:
        parts += [f"## Gradient cosine: {GROUP_TITLES[group]}", "",
                  _matrix_table(tasks, tasks, grad[group]["cosine"]), "",
                  f"mean off-diagonal: {_fmt(grad[group]['mean_off_diagonal'])}", ""]
    if grad["B_per_expert"]:
        parts += ["## Gradient cosine per B head (mean off-diagonal; n/a: a task sends no gradient to the head)",
                  "", "| head | mean off-diagonal cosine | " + " | ".join(f"grad norm {t}" for t in tasks) + " |",
                  "|---|---|" + "---|" * len(tasks)]
        parts += [f"| B_{e['expert']} | {_fmt(e['mean_off_diagonal'])} | "
                  + " | ".join(_fmt(v, 4) for v in e["norm"]) + " |" for e in grad["B_per_expert"]]
        parts.append("")
    parts += ["## Per task", "", "| task | LM loss | grad norm A | grad norm B | grad norm B summed |",
              "|---|---|---|---|---|"]
    parts += [f"| {t} | {_fmt(result['loss'][t], 4)} | " + " | ".join(_fmt(grad[g]["norm"][i], 4) for g in GROUPS)
              + " |" for i, t in enumerate(tasks)]
    parts += ["", "## Per layer (mean off-diagonal cosine)", "", "| layer | A | B | B summed |", "|---|---|---|---|"]
    parts += [f"| {e['layer']} | " + " | ".join(_fmt(e[g]) for g in GROUPS) + " |" for e in grad["per_layer"]]
    routing = result.get("routing_stats")
    if routing:
        experts = [f"e{e}" for e in range(routing["num_experts"])]
        parts += ["", f"## Expert load per task (mean over {routing['layers']} routed layers)", "",
                  _matrix_table(tasks, experts, routing["expert_load"]), "",
                  f"## Router entropy (nats; max ln E = {routing['max_entropy']:.3f})", "",
                  "| layer | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks),
                  "| **mean** | " + " | ".join(_fmt(v) for v in routing["entropy"]) + " |"]
        parts += [f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |"
                  for name, values in routing["entropy_per_layer"].items()]
        information = routing.get("task_expert_mi_per_layer") or {}
        if information:
            top = sorted(information.items(), key=lambda kv: -kv[1])[:5]
            parts += ["", f"## Task-expert mutual information (nats; max ln min(T, E) = "
                      f"{routing['max_task_expert_mi']:.3f})", "",
                      "How much a layer's choice of top expert depends on the task, from each layer's per-task "
                      "load (the layer-averaged load above can hide it: layers preferring different experts "
                      "for a task cancel out).", "",
                      f"Mean over layers: {_fmt(routing['task_expert_mi'], 4)}. Highest:", "",
                      "| layer | MI |", "|---|---|"]
            parts += [f"| {name} | {_fmt(value, 4)} |" for name, value in top]
    similarity = result.get("expert_similarity")
    if similarity:
        top = sorted(((n, v) for n, v in similarity["per_layer"].items() if math.isfinite(v)), key=lambda kv: -kv[1])
        parts += ["", "## Expert similarity (cosine between the experts' updates B_e A_(e))", "",
                  "Mean pairwise cosine of a layer's E updates: near 1, the experts compute one update and "
                  "routing cannot matter; the centred init of b_init_std starts them at -1/(E-1).", "",
                  f"Mean over {len(similarity['per_layer'])} layers: {_fmt(similarity['mean'])}. Most alike:", "",
                  "| layer | cosine |", "|---|---|"]
        parts += [f"| {name} | {_fmt(value)} |" for name, value in top[:5]]
    return "\n".join(parts) + "\n"


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    from asymlora.io import atomic_path

    if tight:  # figures with a colorbar spanning several axes are cropped by bbox_inches instead
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches=None if tight else "tight")
    plt.close(fig)
    return path


def _heatmap(ax: Any, matrix: Any, rows: Sequence[str], columns: Sequence[str], title: str, vmin: float,
             vmax: float, cmap: str) -> Any:
    import matplotlib
    import numpy as np

    data = np.array([[float("nan") if v is None else v for v in row] for row in matrix], dtype=float)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    image = ax.imshow(np.ma.masked_invalid(data), norm=norm, cmap=colormap)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    if len(rows) * len(columns) <= 100:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                value = data[i, j]
                red, green, blue, _ = colormap(norm(value)) if np.isfinite(value) else (1, 1, 1, 1)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, f"{value:.2f}" if np.isfinite(value) else "n/a", ha="center", va="center",
                        fontsize=7, color="white" if dark else "black")
    return image


def plot_grad_cosine(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, grad = result["tasks"], result["gradient"]
    groups = [g for g in GROUPS if not (g == "B_heads_summed" and result["num_experts"] == 1)]
    side = max(3.2, 0.55 * len(tasks) + 1.8)
    fig, axes = plt.subplots(1, len(groups), figsize=(side * len(groups) + 1.0, side))
    image = None
    for ax, group in zip(axes, groups):
        title = {"A": "shared A", "B": "B (all heads)", "B_heads_summed": "B summed over heads"}[group]
        if group == "B" and result["routing"] == "task" and result["num_experts"] > 1:
            title += ", 0 by construction"
        image = _heatmap(ax, grad[group]["cosine"], tasks, tasks,
                         f"{title}\nmean off-diag {_fmt(grad[group]['mean_off_diagonal'], 2)}", -1.0, 1.0, "RdBu_r")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="gradient cosine")
    fig.suptitle(f"{result['method']} ({result['routing']}): task gradient cosine", fontsize=10)
    return _save(fig, path, tight=False)


def plot_expert_load(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing, tasks = result["routing_stats"], result["tasks"]
    experts = [f"e{e}" for e in range(routing["num_experts"])]
    fig, ax = plt.subplots(figsize=(max(3.5, 0.6 * len(experts) + 2.2), max(2.8, 0.5 * len(tasks) + 1.5)))
    image = _heatmap(ax, routing["expert_load"], tasks, experts,
                     f"expert load per task (mean of {routing['layers']} routed layers)", 0.0, 1.0, "viridis")
    fig.colorbar(image, ax=ax, label="share of routing slots")
    return _save(fig, path)


def plot_routing_entropy(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing, tasks = result["routing_stats"], result["tasks"]
    per_layer = routing["entropy_per_layer"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(per_layer) + 4.0), 3.6))
    for t, task in enumerate(tasks):
        values = [float("nan") if per_layer[n][t] is None else per_layer[n][t] for n in per_layer]
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=task)
    ax.axhline(routing["max_entropy"], color="grey", linestyle="--", linewidth=1, label="ln E (uniform)")
    ax.set_ylim(0, routing["max_entropy"] * 1.05 + 1e-6)
    ax.set_xlabel("routed layer (model order; names in analysis.md)")
    ax.set_ylabel("mean router entropy (nats)")
    ax.set_title("router entropy per layer and task")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write analysis.json, analysis.md and the plots (atomically); returns their paths by name."""
    from asymlora.io import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "analysis.json", "markdown": out / "analysis.md"}
    write_json_atomic(paths["json"], _finite(result))
    write_text_atomic(paths["markdown"], markdown_report(result))
    paths["grad_cosine"] = plot_grad_cosine(result, out / "grad_cosine.png")
    if result.get("routing_stats"):
        paths["expert_load"] = plot_expert_load(result, out / "expert_load.png")
        paths["routing_entropy"] = plot_routing_entropy(result, out / "routing_entropy.png")
    return paths


# ---------------------------------------------------------------------------------------------- CLI
def _cli_analyze(args: argparse.Namespace) -> int:
    result = run_analysis(args.out, adapter=args.adapter, config=args.config, model=args.model,
                          mixture=args.mixture, tasks=args.tasks, split=args.split,
                          samples_per_task=args.samples_per_task, batch_size=args.batch_size,
                          max_length=args.max_length, seed=args.seed, dtype=args.dtype)
    print(Path(args.out, "analysis.md").read_text(encoding="utf-8"))
    names = ["analysis.json", "analysis.md", "grad_cosine.png"]
    if result.get("routing_stats"):
        names += ["expert_load.png", "routing_entropy.png"]
    print("wrote " + ", ".join(str(Path(args.out) / n) for n in names))
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "analyze", help="task-conflict analysis: gradient cosines on A vs B, expert load, routing entropy",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="a trained adapter dir (written by `asymlora train`)")
    source.add_argument("--config", help="a training config: analyse a freshly initialised adapter")
    parser.add_argument("--model", default="default", help="base model: 'default', 'tiny' or a local HF dir "
                        "(default: the adapter's training model)")
    parser.add_argument("--mixture", help="mixture whose tasks are compared (default: the training mixture, "
                        "else mix5)")
    parser.add_argument("--tasks", nargs="+", help="tasks to compare (default: the mixture's tasks that the "
                        "adapter knows)")
    parser.add_argument("--split", help="train | val | test (default: val when every task has one, else train)")
    parser.add_argument("--samples-per-task", type=int, default=32, help="samples per task (seeded random)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per forward/backward pass")
    parser.add_argument("--max-length", type=int, help="token limit (default: the training config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample choice")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype to load the base model in")
    parser.add_argument("--out", required=True, help="output dir: analysis.json, analysis.md, *.png")
    parser.set_defaults(func=_cli_analyze)
