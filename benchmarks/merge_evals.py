"""Merge one-task evaluations into one eval dir, so that one-task adapters can be paired with a mixture adapter.

The single-domain runs of ``benchmarks/quality.py`` train one adapter per task and evaluate each on its own
task (``<run>/eval/``: results.json and predictions.jsonl, as ``asymlora eval --out`` writes them). This
script joins such evals, one per task, into a single eval dir with every task, which ``asymlora compare
--reference`` can then pair item by item with a mixture adapter's eval of the same test items:

    python benchmarks/merge_evals.py runs/quality/NAME/single_data-lora-r16-s0-*/eval \\
        --name single_data-lora-r16-s0 --out runs/merged/single_data-lora-r16-s0
    asymlora compare runs/merged/single_data-lora-r16-s0 runs/fulltest500/mixed-*-s0 \\
        --reference single_data-lora-r16-s0 --out paired_single_s0

The evals must not share a task and must have been scored the same way (model, split, number of items,
decoding, prompt suffix, candidates, images, scoring: ``SAME_SETUP``); a mismatch is an error naming the field and the file, and
nothing is written. The merged results.json records which adapter produced each task's scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from asymlora.errors import DataError
from asymlora.evaluate.paired import read_predictions
from asymlora.evaluate.report import load_results, write_report
from asymlora.evaluate.scores import mean_score

# the setup fields that make two evals' scores comparable: they must agree across the merged evals
SAME_SETUP = ("split", "max_samples", "decoding", "prompt_suffix", "candidates", "images", "scoring", "model")


def merge(runs: list[str | Path], name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The merged ``results`` (as ``asymlora eval`` writes them) and the concatenated prediction rows."""
    tasks: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    adapters: dict[str, Any] = {}
    first_file: Path | None = None
    setup: dict[str, Any] = {}
    seconds = 0.0
    for run in runs:
        file = Path(run) / "results.json" if Path(run).is_dir() else Path(run)
        results = load_results(file)
        run_setup = results.get("setup", {})
        if first_file is None:
            first_file, setup = file, {key: run_setup.get(key) for key in SAME_SETUP}
        for key in SAME_SETUP:
            if run_setup.get(key) != setup[key]:
                raise DataError(f"{file}: field 'setup.{key}' is {run_setup.get(key)!r}, but {first_file} has "
                                f"{setup[key]!r}; merge evals scored the same way")
        if not results.get("tasks"):
            raise DataError(f"{file}: field 'tasks' is empty; nothing to merge")
        _, rows = read_predictions(file.parent)
        for task, result in results["tasks"].items():
            if task in tasks:
                raise DataError(f"{file}: task {task!r} is also in {adapters[task]['results']}; give one eval per task")
            tasks[task] = result
            adapters[task] = {"adapter": run_setup.get("adapter"), "results": str(file)}
            task_rows = [row for _, row in rows if row.get("task") == task]
            if len(task_rows) != result.get("count", len(task_rows)):
                raise DataError(f"{file.parent / 'predictions.jsonl'}: {len(task_rows)} rows of task {task!r}, but "
                                f"{file} counts {result.get('count')}")
            predictions += task_rows
        seconds += float(results.get("seconds") or 0.0)
    merged = {"name": name, "tasks": tasks, "mean": mean_score(tasks),
              "setup": {**setup, "adapter": "merged one-task adapters", "merged_from": adapters},
              "seconds": round(seconds, 1)}
    return merged, predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evals", nargs="+", help="`asymlora eval` output dirs (or their results.json), one per task")
    parser.add_argument("--name", required=True, help="the merged run's name (what `asymlora compare` shows)")
    parser.add_argument("--out", required=True, help="dir for the merged results.json, predictions.jsonl, report.md")
    args = parser.parse_args(argv)
    try:
        results, predictions = merge(args.evals, args.name)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_report(Path(args.out), results, predictions)
    print(f"{args.out}: {len(results['tasks'])} tasks, {len(predictions)} items, mean {results['mean']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
