"""Pool the paired comparisons of several training seeds: `asymlora compare --reference` outputs, one per seed.

Each ``paired.json`` holds one seed's differences to its reference (e.g. every method's seed-1 adapter against
LoRA's seed-1 adapter) on the same test items, with bootstrap intervals over the items. Those intervals cover
the test set's sampling error only. This script puts the seeds side by side: a method is a run name with its
``-s<seed>`` suffix removed, and for each method it reports every seed's difference in the mean with its
interval, the mean and sample standard deviation over seeds, and how many seeds are ahead; per task, the
mean over seeds. Every file must compare the same tasks on the same numbers of items.

    python benchmarks/paired_seeds.py runs/quality/cpu_mix5_500steps_all/paired/s{0,1,2} \\
        --out runs/paired_seeds/cpu_mix5_500steps_all

writes ``paired_seeds.json`` and ``paired_seeds.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from asymlora.errors import DataError
from asymlora.evaluate.paired import format_interval, format_signed
from asymlora.io import read_json, write_json_and_markdown

SEED_SUFFIX = re.compile(r"-s(\d+)$")


def method_of(run: str) -> tuple[str, int | None]:
    """``mixed-asymlora-r5-s1`` -> (``mixed-asymlora-r5``, 1); a name without a seed suffix keeps its name."""
    match = SEED_SUFFIX.search(run)
    return (run[: match.start()], int(match.group(1))) if match else (run, None)


def load(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A ``paired.json`` (or the dir holding one) and its content."""
    path = Path(path)
    path = path / "paired.json" if path.is_dir() else path
    data = read_json(path, "the paired.json of `asymlora compare --reference`")
    for key in ("reference", "tasks", "runs"):
        if key not in data:
            raise DataError(f"{path}: no {key!r} field; is it the paired.json of `asymlora compare --reference`?")
    return path, data


def pool(files: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """``{"reference", "tasks", "seeds", "methods": {method: {"seeds": {seed: mean entry}, "mean", "std",
    "ahead", "tasks": {task: {"mean", "std"}}}}}`` over the given per-seed comparisons."""
    first_path, first = files[0]
    reference, _ = method_of(first["reference"])
    tasks = _task_items(first)
    seeds: list[str] = []
    per_method: dict[str, dict[str, dict[str, Any]]] = {}
    for path, data in files:
        ref, seed = method_of(data["reference"])
        label = str(seed) if seed is not None else data["reference"]
        if ref != reference:
            raise DataError(f"{path}: field 'reference' is {data['reference']!r}, but {first_path} compares "
                            f"against {first['reference']!r}; pool comparisons against the same method")
        if label in seeds:
            raise DataError(f"{path}: seed {label} appears in two of the given files")
        theirs = _task_items(data)
        if theirs != tasks:
            raise DataError(f"{path}: field 'tasks' differs from {first_path} ({theirs} against {tasks}); "
                            "every seed must be scored on the same tasks and numbers of items")
        seeds.append(label)
        for run, entry in data["runs"].items():
            method, _ = method_of(run)
            if label in per_method.setdefault(method, {}):
                raise DataError(f"{path}: two runs of method {method!r} in one comparison")
            per_method[method][label] = entry
    methods: dict[str, Any] = {}
    for method, by_seed in per_method.items():
        means = [entry["mean"]["diff"] for entry in by_seed.values()]
        methods[method] = {
            "seeds": {seed: entry["mean"] for seed, entry in by_seed.items()},
            "mean": statistics.mean(means),
            "std": statistics.stdev(means) if len(means) > 1 else None,
            "ahead": sum(value > 0 for value in means),
            "tasks": {task: _spread([entry["tasks"][task]["diff"] for entry in by_seed.values()]) for task in tasks},
        }
    return {"reference": reference, "tasks": tasks, "seeds": seeds, "methods": methods,
            "files": [str(path) for path, _ in files]}


def _task_items(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a comparison scored per task: metric, direction and number of items."""
    return {t: {k: info[k] for k in ("metric", "higher_is_better", "items")} for t, info in data["tasks"].items()}


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def _mean_std(entry: dict[str, Any]) -> str:
    return format_signed(entry["mean"]) + ("" if entry["std"] is None else f" ± {entry['std']:.3f}")


def markdown(pooled: dict[str, Any]) -> str:
    """One row per method: each seed's paired difference in the mean [interval], mean ± std over seeds, seeds
    ahead, and each task's mean ± std over seeds."""
    seeds, tasks = pooled["seeds"], pooled["tasks"]
    lines = [f"Differences to **{pooled['reference']}** of the same seed on the same test items, pooled over "
             f"seeds {', '.join(seeds)}. Per seed: the paired difference in the mean over tasks [95% bootstrap "
             "interval over the items]. Then the mean ± sample std over seeds of those differences, which carries "
             "the seed-to-seed spread the per-seed intervals leave out, and per task the same over seeds (a "
             "lower-is-better metric as the change in 1 − value, unclipped).", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std over seeds | seeds ahead | "
             + " | ".join(f"{t} ({info['items']} items)" for t, info in tasks.items()) + " |",
             "|---|" + "---|" * (len(seeds) + 2 + len(tasks))]
    for method, row in pooled["methods"].items():
        cells = []
        for seed in seeds:
            entry = row["seeds"].get(seed)
            cells.append("" if entry is None else format_interval(entry))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_mean_std(row)} | {row['ahead']}/{len(row['seeds'])} | "
                     + " | ".join(_mean_std(row["tasks"][t]) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paired", nargs="+", help="paired.json files (or the dirs holding them), one per seed")
    parser.add_argument("--out", required=True, help="dir for paired_seeds.json and paired_seeds.md")
    args = parser.parse_args(argv)
    try:
        pooled = pool([load(path) for path in args.paired])
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = markdown(pooled)
    write_json_and_markdown(args.out, "paired_seeds", pooled, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
