"""How tasks use the experts of a routed adapter (per-task expert load, router entropy, task-expert mutual
information) and how alike the experts' updates are."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from asymlora.analyze.cosine import cosine_from_gram, mean_off_diagonal


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
