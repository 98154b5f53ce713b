"""Paired comparison of evaluated runs on the same test items: `asymlora compare --reference RUN`.

Two runs evaluated on the same items differ by less than their scores' separate error bars suggest, because
the items' difficulty is shared. The paired bootstrap resamples the test items of each task with replacement,
the same resample for every run, recomputes each run's task scores and mean over tasks from the per-item
scores in ``predictions.jsonl``, and reports each run's difference to the reference with a 95% percentile
interval. Differences are oriented so that positive is better: a lower-is-better metric (CER) enters as
1 - value, clipped at 0 in the mean over tasks as in :func:`asymlora.evaluate.scores.mean_score`, and not
clipped in the task's own difference (a CER that falls from 1.3 to 1.1 counts there).

What it measures is the uncertainty from the finite test set, for these trained adapters. It says nothing
about the spread between training seeds, which needs several trained runs per method.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asymlora.errors import DataError
from asymlora.evaluate.scores import headline, mean_score, oriented

CONFIDENCE = 0.95


def read_predictions(run: str | Path) -> tuple[Path, list[tuple[int, dict[str, Any]]]]:
    """The rows of an `asymlora eval` output's ``predictions.jsonl`` (the run dir or the file), each with its
    line number; a line that is not a JSON object stops it with an error naming the file and line."""
    path = Path(run)
    path = path / "predictions.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: no predictions.jsonl (the per-item scores that `asymlora eval` writes for the "
                        "built-in tasks)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    return path, rows


def load_predictions(run: str | Path, max_items_per_task: int | None = None) -> dict[str, dict[Any, float]]:
    """Per-item scores of an `asymlora eval` output dir: ``{task: {item id: score}}``, in file order; with
    ``max_items_per_task``, only each task's first that many items (the items an eval with ``--max-samples``
    of that size scores, so an all-items eval can be compared with a shorter one)."""
    if max_items_per_task is not None and max_items_per_task < 1:
        raise DataError(f"--max-items-per-task: {max_items_per_task} must be at least 1")
    path, rows = read_predictions(run)
    scores: dict[str, dict[Any, float]] = {}
    for line_no, row in rows:
        if max_items_per_task is not None and len(scores.get(row.get("task"), ())) >= max_items_per_task:
            continue
        try:
            task, item, score = row["task"], row["id"], float(row["score"])
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}, line {line_no}: expected a JSON object with 'task', 'id' and a numeric "
                            f"'score' ({error})") from None
        key = json.dumps(item) if isinstance(item, (list, dict)) else item
        task_scores = scores.setdefault(task, {})
        if key in task_scores:
            raise DataError(f"{path}, line {line_no}: item id {item!r} of task {task!r} appears twice")
        task_scores[key] = score
    return scores


def results_on_first_items(results: dict[str, Any], run: str | Path, max_items_per_task: int) -> dict[str, Any]:
    """``results`` (a run's ``results.json``) recomputed on each task's first ``max_items_per_task`` items of its
    ``predictions.jsonl``: each task's headline metric is the mean of those items' scores, as `asymlora eval`
    computes it, with ``count`` set to match, and the mean over tasks follows. The task's other figures (e.g.
    exact match, majority baselines) belong to all its items and are left out."""
    scores = load_predictions(run, max_items_per_task)
    tasks: dict[str, dict[str, Any]] = {}
    for task, result in results["tasks"].items():
        metric, _, higher = headline(result)
        items = list(scores.get(task, {}).values())
        if not items:
            raise DataError(f"{Path(run) / 'predictions.jsonl' if Path(run).is_dir() else run}: no items of task "
                            f"{task!r}, so its score on the first {max_items_per_task} cannot be recomputed")
        tasks[task] = {"task": task, "metric": metric, metric: float(np.mean(items)), "higher_is_better": higher,
                       "count": len(items)}
    setup = {**results.get("setup", {}), "max_items_per_task": max_items_per_task}
    return {**results, "tasks": tasks, "mean": mean_score(tasks), "setup": setup}


def paired_bootstrap(runs: dict[str, tuple[dict[str, Any], str | Path]], reference: str, resamples: int = 10_000,
                     seed: int = 0, max_items_per_task: int | None = None) -> dict[str, Any]:
    """Differences of every run to ``reference`` on the items they share, with bootstrap intervals.

    ``runs`` maps a run's name to its ``results.json`` content and its output dir. Every run must have scored
    the reference's tasks on the same item ids (with ``max_items_per_task``: each task's first that many).
    Returns ``{"reference", "resamples", "confidence", "tasks": {task: {"metric", "higher_is_better", "items"}},
    "runs": {name: {"mean": {...}, "tasks": {task: {...}}}}}``
    where each difference entry holds ``diff`` (on all items), ``low``/``high`` (the interval), ``p_ahead``
    (share of resamples where the run is ahead) and, per task, ``ahead``/``behind`` (items scored higher /
    lower than the reference's).
    """
    if reference not in runs:
        raise DataError(f"--reference: {reference!r} is not one of the compared runs ({', '.join(runs)})")
    if resamples < 1:
        raise DataError(f"--resamples: {resamples} must be at least 1")
    ref_results, ref_dir = runs[reference]
    tasks = list(ref_results["tasks"])
    names = list(runs)
    items = load_predictions(ref_dir, max_items_per_task)
    per_run = {name: items if name == reference else load_predictions(run_dir, max_items_per_task)
               for name, (_, run_dir) in runs.items()}
    ref_row = names.index(reference)
    rng = np.random.default_rng(seed)
    full = np.zeros((len(names), len(tasks)))  # oriented task scores on all items
    sampled = np.zeros((len(names), len(tasks), resamples))  # ... on each resample
    summary: dict[str, Any] = {"reference": reference, "resamples": resamples, "confidence": CONFIDENCE,
                               "seed": seed, "max_items_per_task": max_items_per_task, "tasks": {},
                               "runs": {n: {"tasks": {}} for n in names if n != reference}}
    for t, task in enumerate(tasks):
        metric, _, higher = headline(ref_results["tasks"][task])
        ids = list(items.get(task, {}))
        if not ids:
            raise DataError(f"{Path(ref_dir) / 'predictions.jsonl'}: no items of task {task!r}")
        matrix = np.empty((len(names), len(ids)))
        for r, name in enumerate(names):
            scored = per_run[name].get(task, {})
            missing = [i for i in ids if i not in scored]
            if missing or len(scored) != len(ids):
                raise DataError(
                    f"{Path(runs[name][1]) / 'predictions.jsonl'}: task {task!r} has {len(scored)} items, "
                    f"{len(missing)} of the reference's {len(ids)} missing (e.g. {missing[:1]}); compare runs "
                    "evaluated on the same items (same --split and --max-samples, or --max-items-per-task no "
                    "larger than the shorter eval's)")
            matrix[r] = [scored[i] for i in ids]
        draw = rng.integers(0, len(ids), size=(resamples, len(ids)))  # one resample of the items for every run
        raw = np.stack([matrix[r][draw].mean(axis=1) for r in range(len(names))])  # (runs, resamples)
        full[:, t] = oriented(matrix.mean(axis=1), higher)
        sampled[:, t] = oriented(raw, higher)
        summary["tasks"][task] = {"metric": metric, "higher_is_better": higher, "items": len(ids)}
        sign = 1.0 if higher else -1.0
        for r, name in enumerate(names):
            if name == reference:
                continue
            better = sign * (matrix[r] - matrix[ref_row])
            task_diff = sign * (matrix[r].mean() - matrix[ref_row].mean())  # unclipped: CER > 1 still counts
            entry = _interval(task_diff, sign * (raw[r] - raw[ref_row]))
            entry.update(ahead=int((better > 0).sum()), behind=int((better < 0).sum()))
            summary["runs"][name]["tasks"][task] = entry
    means_full, means_sampled = full.mean(axis=1), sampled.mean(axis=1)
    for r, name in enumerate(names):
        if name != reference:
            summary["runs"][name]["mean"] = _interval(means_full[r] - means_full[ref_row],
                                                      means_sampled[r] - means_sampled[ref_row])
    return summary


def _interval(diff: float, resampled: np.ndarray) -> dict[str, float]:
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return {"diff": float(diff), "low": float(low), "high": float(high), "p_ahead": float((resampled > 0).mean())}


def markdown(summary: dict[str, Any]) -> str:
    """The paired table: one row per run, the mean's and each task's difference to the reference."""
    tasks = summary["tasks"]
    pct = round(summary["confidence"] * 100)
    lines = [f"Paired differences to **{summary['reference']}** on the same test items (positive = better: a "
             "lower-is-better metric such as CER enters as 1 − value, clipped at 0 in the mean as in the "
             f"comparison table, not in its task's column), with {pct}% bootstrap intervals over the items "
             f"({summary['resamples']:,} "
             "resamples). They measure the test set's sampling error for these adapters, not the spread "
             "between training seeds." + (f" Each task's first {summary['max_items_per_task']} items only "
                                           "(--max-items-per-task)." if summary.get("max_items_per_task") else ""),
             "",
             "| run | mean | P(ahead) | " + " | ".join(
                 f"{t} ({info['items']} items)" for t, info in tasks.items()) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for name, run in summary["runs"].items():
        mean = run["mean"]
        cells = [f"{format_interval(e)} ({e['ahead']}↑ {e['behind']}↓)"
                 for e in (run["tasks"][t] for t in tasks)]
        lines.append(f"| {name} | {format_interval(mean)} | "
                     f"{mean['p_ahead']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Per task: difference [interval] (items the run scored higher ↑ / lower ↓ than the reference)."]
    return "\n".join(lines) + "\n"


def format_signed(value: float) -> str:
    """A difference with its sign and a typographic minus: ``+0.012``, ``−0.004``."""
    return f"{value:+.3f}".replace("-", "−")


def format_interval(entry: dict[str, float]) -> str:
    """A difference entry (``diff``, ``low``, ``high``) as ``+0.012 [+0.001, +0.022]``."""
    return f"{format_signed(entry['diff'])} [{format_signed(entry['low'])}, {format_signed(entry['high'])}]"


def resolve_reference(reference: str, names: Sequence[str], dirs: Sequence[str | Path]) -> str:
    """The compared run's name that ``reference`` names: a run name, or one of the run dirs given."""
    if reference in names:
        return reference
    for name, run in zip(names, dirs):
        if Path(run).resolve() == Path(reference).resolve():
            return name
    raise DataError(f"--reference: {reference!r} is neither the name nor the dir of a compared run "
                    f"({', '.join(names)})")
