"""Evaluation reports: ``results.json``, a markdown table and a PNG bar chart; several runs side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.errors import DataError
from asymlora.evaluate.paired import markdown as paired_markdown
from asymlora.evaluate.paired import paired_bootstrap, resolve_reference, results_on_first_items
from asymlora.evaluate.scores import headline, oriented
from asymlora.io import atomic_path, read_json, write_json_and_markdown, write_json_atomic, write_text_atomic


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    """One row per task (metric and arrow), one column per run, plus the mean of higher-is-better scores."""
    tasks: list[str] = []
    for results in runs.values():
        tasks.extend(t for t in results["tasks"] if t not in tasks)
    names = list(runs)
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task in tasks:
        metric, arrow, cells = "", "", []
        for name in names:
            result = runs[name]["tasks"].get(task)
            if result is None:
                cells.append("")
                continue
            metric, value, higher = headline(result)
            arrow = "↑" if higher else "↓"
            cells.append(f"{value:.3f}")
        lines.append(f"| {task} | {metric} {arrow} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | higher-is-better scores (CER as 1-CER) | "
                 + " | ".join(f"{runs[n]['mean']:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(runs: dict[str, dict[str, Any]], path: Path, title: str = "asymlora eval") -> Path:
    """Grouped bars: one group per task, one bar per run (lower-is-better metrics shown as 1 - value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: list[str] = []
    for results in runs.values():
        tasks.extend(t for t in results["tasks"] if t not in tasks)
    labels = [*tasks, "mean"]
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 3.8))
    for i, (name, results) in enumerate(runs.items()):
        values = []
        for task in tasks:
            result = results["tasks"].get(task)
            if result is None:
                values.append(0.0)
                continue
            _, value, higher = headline(result)
            values.append(oriented(value, higher))
        values.append(results["mean"])
        positions = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(positions, values, width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([t if t not in _lower_tasks(runs) else f"{t}\n(1-CER)" for t in labels])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def _lower_tasks(runs: dict[str, dict[str, Any]]) -> set[str]:
    return {t for r in runs.values() for t, res in r["tasks"].items() if not res.get("higher_is_better", True)}


def write_report(out: Path, results: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write results.json, predictions.jsonl, report.md and scores.png for one run."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "predictions.jsonl",
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    name = results.get("name", out.name)
    table = markdown_table({name: results})
    write_text_atomic(out / "report.md", f"# {name}\n\n{_describe(results)}\n\n{table}{_baselines(results)}")
    plot = bar_chart({name: results}, out / "scores.png", title=name)
    return {"results": out / "results.json", "report": out / "report.md", "plot": plot,
            "predictions": out / "predictions.jsonl"}


BASELINES = {"majority": "the task's most common train answer",
             "majority_by_question": "the most common train answer of the question's template"}


def _baselines(results: dict[str, Any]) -> str:
    """A table of the answer-prior baselines on the same items, for the tasks that have them."""
    rows = [(task, result) for task, result in results.get("tasks", {}).items()
            if any(key in result for key in BASELINES)]
    if not rows:
        return ""
    lines = ["", "Baselines on the same items (" + "; ".join(f"{k}: {v}" for k, v in BASELINES.items()) + "):", "",
             "| task | metric | score | " + " | ".join(BASELINES) + " |", "|---|---|---|" + "---|" * len(BASELINES)]
    for task, result in rows:
        metric, value, _ = headline(result)
        cells = [f"{result[k]:.3f}" if k in result else "" for k in BASELINES]
        lines.append(f"| {task} | {metric} | {value:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _describe(results: dict[str, Any]) -> str:
    setup = results.get("setup", {})
    return ", ".join(f"{k}: {v}" for k, v in setup.items() if v is not None)


def load_results(run: str | Path) -> dict[str, Any]:
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: no results.json (run `asymlora eval ... --out DIR` first)")
    return read_json(path, "the results.json of `asymlora eval --out DIR`")


def compare(runs: Sequence[str | Path], out: Path, reference: str | None = None, resamples: int = 10_000,
            seed: int = 0, max_items_per_task: int | None = None) -> dict[str, Path]:
    """Put several evaluated runs side by side: compare.md and compare.png in ``out``. With ``reference`` (a
    run's name or dir), also paired.md and paired.json: every other run's difference to it on the same test
    items, with bootstrap intervals (:mod:`asymlora.evaluate.paired`). With ``max_items_per_task``, every
    score is recomputed from ``predictions.jsonl`` on each task's first that many items, so that an eval of
    every test item and one with ``--max-samples N`` are compared on the same N items."""
    loaded: dict[str, dict[str, Any]] = {}
    dirs: list[str | Path] = []
    for run in runs:
        results = load_results(run)
        if max_items_per_task is not None:
            results = results_on_first_items(results, run, max_items_per_task)
        name = results.get("name") or Path(run).name
        while name in loaded:
            name += "'"
        loaded[name] = results
        dirs.append(run)
    summary = None
    if reference is not None:  # computed before anything is written: a mismatch leaves no partial output
        ref_name = resolve_reference(reference, list(loaded), dirs)
        summary = paired_bootstrap({n: (loaded[n], d) for n, d in zip(loaded, dirs)}, ref_name,
                                   resamples=resamples, seed=seed, max_items_per_task=max_items_per_task)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(loaded)
    if max_items_per_task is not None:
        table = f"Every run scored on each task's first {max_items_per_task} items (--max-items-per-task).\n\n" + table
    write_text_atomic(out / "compare.md", table)
    plot = bar_chart(loaded, out / "compare.png", title="comparison")
    paths = {"table": out / "compare.md", "plot": plot}
    if summary is not None:
        write_json_and_markdown(out, "paired", summary, paired_markdown(summary))
        paths.update(paired=out / "paired.md", paired_json=out / "paired.json")
    return paths
