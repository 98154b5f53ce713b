"""The outputs of an analysis: ``analysis.json``, ``analysis.md`` and the plots (matplotlib, imported
when a plot is drawn)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.analyze.gradients import GROUPS
from asymlora.io import atomic_path, write_json_atomic, write_text_atomic


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
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "analysis.json", "markdown": out / "analysis.md"}
    write_json_atomic(paths["json"], _finite(result))
    write_text_atomic(paths["markdown"], markdown_report(result))
    paths["grad_cosine"] = plot_grad_cosine(result, out / "grad_cosine.png")
    if result.get("routing_stats"):
        paths["expert_load"] = plot_expert_load(result, out / "expert_load.png")
        paths["routing_entropy"] = plot_routing_entropy(result, out / "routing_entropy.png")
    return paths
