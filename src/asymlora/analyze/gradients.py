"""The gradient of each task's LM loss on the A and B banks, and the cosines between tasks' gradients
per parameter group (``A``, ``B``, ``B_heads_summed``, ``B_per_expert``; defined in
:mod:`asymlora.analyze.run`'s docstring, the help of ``asymlora analyze``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from asymlora.analyze.cosine import cosine_from_gram, mean_off_diagonal
from asymlora.errors import ConfigError
from asymlora.train import next_token_loss

GROUPS = ("A", "B", "B_heads_summed")


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
    """Cosine matrices between the tasks' gradients (the groups: see :mod:`asymlora.analyze.run`).

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
