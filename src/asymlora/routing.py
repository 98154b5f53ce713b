"""Gates g(x) over the E experts, the load-balancing loss, and the routing state a model's layers share.

All functions work on flattened tokens: ``logits`` and the returned gates are ``(T, E)``.
Routers run in float32 (``logits`` are float32), whatever the model's dtype.

Semantics (p = softmax(logits), T tokens, E experts):
- task:   g_t = onehot(task_t)
- dense:  g_t = p_t
- topk:   g_t,e = p_t,e / sum_{j in topk(p_t)} p_t,j  for e in topk(p_t), else 0   (gate values kept in
          the product, so the router receives the LM loss gradient through them); for k = 1,
          g_t,e = p_t,e for the top expert (Switch Transformer): renormalised, that gate would be the
          constant 1 and the router would learn from the balance loss alone
- hybrid: g_t = softmax(logits_t + bias[task_t]); tokens whose task id is -1 use softmax(logits_t)
- balance loss (Switch Transformer): E * sum_e f_e * P_e, f_e = share of routing slots sent to
  expert e (argmax for dense/hybrid, the k chosen for topk, each counting 1/k), P_e = mean p_t,e,
  both over the tokens of ``token_mask`` only.

Dense and hybrid routing leave ``dispatch`` unset (None: the argmax of ``probs``), so that it is computed
once for all layers together (:func:`argmax_dispatch` on their stacked ``probs``) rather than layer by layer.

Across the layers of one model, a :class:`RoutingContext` carries each forward's task ids and token mask
to every layer and collects what their routers produced; :func:`group_records` stacks those records per
group of layers that route the same tokens, so that the balance loss and the routing statistics
(:func:`accumulate_routing_stats`) take one pass per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


class RoutingContext:
    """Per-forward state shared by all adapter layers of one model (never saved)."""

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None  # (B,) long; -1 = unknown task
        self.token_mask: torch.Tensor | None = None  # (B, S) bool: tokens counted by the balance loss
        self.collecting = False
        self.collect_stats = False
        self.disabled = False
        self.records: list[tuple[str, Any]] = []  # (layer name, (probs, dispatch or None, mask, task ids))
        # (the task_ids tensor, {(input shape, device): per-token ids}): the layers' shared per-token ids
        self.token_task_cache: tuple[torch.Tensor | None, dict] | None = None


@dataclass
class Routing:
    """Result of routing the tokens of one layer."""

    gates: torch.Tensor  # (T, E), what multiplies each expert's output
    probs: torch.Tensor | None = None  # (T, E) router softmax (None for task routing)
    dispatch: torch.Tensor | None = None  # (T, E) share of each token's slots per expert (no grad); None = argmax


def task_gates(token_task_ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot gates from per-token task ids (all ids must be in [0, E))."""
    if num_experts == 1:
        return torch.ones(token_task_ids.shape[0], 1, dtype=dtype, device=token_task_ids.device)
    return F.one_hot(token_task_ids, num_experts).to(dtype)


def argmax_dispatch(probs: torch.Tensor) -> torch.Tensor:
    """One routing slot per token, at its most probable expert: one-hot of the argmax (no grad)."""
    return F.one_hot(probs.detach().argmax(dim=-1), probs.shape[-1]).to(probs.dtype)


def dense_routing(logits: torch.Tensor) -> Routing:
    probs = logits.softmax(dim=-1)
    return Routing(gates=probs, probs=probs)  # dispatch: the argmax, computed when needed


def topk_routing(logits: torch.Tensor, top_k: int) -> Routing:
    probs = logits.softmax(dim=-1)
    values, indices = probs.topk(top_k, dim=-1)
    if top_k > 1:  # k = 1 keeps p itself (see "Semantics")
        values = values / values.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, indices, values)
    dispatch = torch.zeros_like(probs).scatter(-1, indices, 1.0 / top_k).detach()
    return Routing(gates=gates, probs=probs, dispatch=dispatch)


def hybrid_routing(logits: torch.Tensor, task_bias: torch.Tensor, token_task_ids: torch.Tensor | None) -> Routing:
    """Router logits plus the learned bias of the token's task; task id -1 (or none) = router only."""
    if token_task_ids is not None:
        known = token_task_ids >= 0
        bias = task_bias[token_task_ids.clamp(min=0)] * known.unsqueeze(-1).to(task_bias.dtype)
        logits = logits + bias
    return dense_routing(logits)


def balance_loss(probs: torch.Tensor, dispatch: torch.Tensor | None, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-style load-balancing loss E * sum_e f_e * P_e over the tokens of ``token_mask`` (T,).

    ``probs`` and ``dispatch`` are (T, E) for one layer, or (L, T, E) for L layers routing the same
    tokens: the result is then the sum of the L layers' losses, computed in one pass. ``dispatch`` None
    means :func:`argmax_dispatch`.
    """
    num_experts = probs.shape[-1]
    dispatch = argmax_dispatch(probs) if dispatch is None else dispatch.to(probs.dtype)
    if token_mask is not None:
        weights = token_mask.to(probs.dtype)
        count = weights.sum().clamp(min=1.0)
        f = torch.matmul(weights, dispatch) / count  # (..., E)
        p = torch.matmul(weights, probs) / count
    else:
        f = dispatch.mean(-2)
        p = probs.mean(-2)
    return num_experts * (f * p).sum()


@dataclass
class RouterGroup:
    """The router outputs of the layers (``names``) that routed the same tokens in one forward, stacked."""

    names: tuple[str, ...]
    probs: torch.Tensor  # (L, T, E), with the graph
    dispatch: torch.Tensor  # (L, T, E), no grad
    mask: torch.Tensor | None  # (T,): the tokens the balance loss counts (the same for every layer)
    token_tasks: torch.Tensor | None  # (T,) task id per token (the same for every layer)


def group_records(records: list[tuple[str, Any]]) -> list[RouterGroup]:
    """Stack the records of layers whose tokens match: same (T, E), device and dtype, and both with or
    both without a token mask, explicit dispatch and task ids. Their masks and task ids are then the same
    tensors (both derive from the routing context's per-sample values), so the first layer's are used."""
    buckets: dict[tuple, list[tuple[str, Any]]] = {}
    for name, (probs, dispatch, mask, tasks) in records:
        key = (tuple(probs.shape), probs.device, probs.dtype, mask is None, dispatch is None, tasks is None)
        buckets.setdefault(key, []).append((name, (probs, dispatch, mask, tasks)))
    groups = []
    for members in buckets.values():
        names = tuple(name for name, _ in members)
        probs = torch.stack([record[0] for _, record in members])
        explicit = [record[1] for _, record in members]
        dispatch = argmax_dispatch(probs) if explicit[0] is None else torch.stack(explicit).detach()
        _, (_, _, mask, tasks) = members[0]
        groups.append(RouterGroup(names, probs, dispatch, mask, tasks))
    return groups


def accumulate_routing_stats(totals: dict[tuple[str, ...], dict[str, torch.Tensor]], groups: list[RouterGroup],
                              num_tasks: int) -> None:
    """Add this forward's detached statistics (expert load, entropy, per-task load) to ``totals``, stacked
    per group of layers (a few kernels per group).

    Masks are applied by multiplication (no boolean indexing), so nothing synchronises with the device.
    """
    with torch.no_grad():
        for group in groups:
            # float32 whatever the routers' dtype (DeepSpeed's bf16 mode casts them to bf16)
            probs, dispatch = group.probs.detach().float(), group.dispatch.float()
            layers, tokens, experts = probs.shape
            device = probs.device
            weights = group.mask.float() if group.mask is not None else torch.ones(tokens, device=device)
            entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # (L, T)
            entry = totals.setdefault(group.names, {
                "load": torch.zeros(layers, experts, device=device),
                "entropy_sum": torch.zeros(layers, device=device),
                "tokens": torch.zeros((), device=device),
            })
            entry["load"] += torch.matmul(weights, dispatch)
            entry["entropy_sum"] += entropy @ weights
            entry["tokens"] += weights.sum()
            if group.token_tasks is not None and num_tasks:
                known = (group.token_tasks >= 0).to(weights.dtype) * weights
                task_load = entry.setdefault("task_load", torch.zeros(layers, num_tasks, experts, device=device))
                task_load.index_add_(1, group.token_tasks.clamp(min=0), dispatch * known[:, None])
