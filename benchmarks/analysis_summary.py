"""One table over several ``asymlora analyze`` outputs: the figures of each adapter that docs/RESULTS.md reads.

``asymlora analyze --adapter RUN --out DIR`` writes, per adapter, ``analysis.json`` (per-layer cosines, loads
and entropies, hundreds of kB) and ``analysis.md``. This script keeps what one row per adapter needs: the
LM loss per task on the analysed items, the mean off-diagonal gradient cosine between tasks on the shared A,
on the B heads and on B summed over heads, and for routed adapters the router entropy per task, each task's
largest expert load (for hybrid routing, the load of the task's own head), the task-expert mutual
information and the mean similarity of the experts' updates.

    python benchmarks/analysis_summary.py base=runs/analyze/router_base rinit05=runs/analyze/router_rinit05 \\
        --out docs/results --name analyze_router_init

writes ``<name>.json`` and ``<name>.md`` under ``--out``. An argument is ``LABEL=DIR`` (or ``LABEL=FILE``) or
a bare path, whose folder name is its label.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from asymlora.errors import DataError
from asymlora.io import read_json, write_json_and_markdown

COSINES = ("A", "B", "B_heads_summed")


def load(argument: str) -> tuple[str, Path, dict[str, Any]]:
    """``LABEL=PATH`` or ``PATH`` (an analyze output dir or its analysis.json) -> (label, file, content)."""
    label, _, path_text = argument.rpartition("=")
    path = Path(path_text)
    path = path / "analysis.json" if path.is_dir() else path
    data = read_json(path, "the analysis.json of `asymlora analyze`")
    for key in ("method", "routing", "num_experts", "r", "tasks", "loss", "gradient"):
        if key not in data:
            raise DataError(f"{path}: no {key!r} field; is it the analysis.json of `asymlora analyze`?")
    return label or path.parent.name, path, data


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """The one-row figures of one analysis."""
    tasks = data["tasks"]
    row: dict[str, Any] = {
        "adapter": data.get("adapter"), "method": data["method"], "routing": data["routing"],
        "num_experts": data["num_experts"], "r": data["r"], "samples": data.get("samples"),
        "loss": data["loss"], "mean_loss": statistics.mean(data["loss"][t] for t in tasks),
        "gradient_cosine": {group: data["gradient"][group]["mean_off_diagonal"] for group in COSINES},
        "router": None, "expert_similarity": (data.get("expert_similarity") or {}).get("mean"),
    }
    routing = data.get("routing_stats")
    if routing:
        load = dict(zip(tasks, routing["expert_load"]))
        top = {t: max(range(len(shares)), key=shares.__getitem__) for t, shares in load.items()}
        row["router"] = {
            "entropy": dict(zip(tasks, routing["entropy"])), "max_entropy": routing["max_entropy"],
            "top_expert": {t: {"expert": e, "load": load[t][e]} for t, e in top.items()},
            # hybrid routing: head t is task t's own head
            "own_head_load": ({t: load[t][i] for i, t in enumerate(tasks)} if data["routing"] == "hybrid" else None),
            # older analyses lack the mutual information
            "task_expert_mi": routing.get("task_expert_mi"), "max_task_expert_mi": routing.get("max_task_expert_mi"),
        }
    return row


def _method(row: dict[str, Any]) -> str:
    return row["method"] + (f" ({row['routing']})" if row["num_experts"] > 1 else "")


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}–{high:.3f}"


def markdown(adapters: dict[str, dict[str, Any]]) -> str:
    lines = ["Per adapter: the mean LM loss over tasks on the analysed test items; the mean off-diagonal cosine "
             "between the tasks' gradients on the shared A, on B (all heads) and on B summed over heads; for "
             "routed adapters the router entropy per task (range over tasks, of ln E), each task's largest "
             "expert load (hybrid: its own head's load), the task-expert mutual information (of its maximum) "
             "and the mean cosine between the experts' updates B_e A.", "",
             "| adapter | method | E | r | mean LM loss | cos A | cos B | cos B summed | router entropy | "
             "largest load (own head) | task-expert MI | expert similarity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in adapters.items():
        cos = row["gradient_cosine"]
        router = row["router"]
        cells = ["", "", "", ""]
        if router:
            load = router["own_head_load"] or {t: v["load"] for t, v in router["top_expert"].items()}
            cells = [f"{_span(list(router['entropy'].values()))} of {router['max_entropy']:.3f}",
                     _span(list(load.values())) + (" (own)" if router["own_head_load"] else ""),
                     "" if router["task_expert_mi"] is None
                     else f"{router['task_expert_mi']:.3f} of {router['max_task_expert_mi']:.3f}",
                     "" if row["expert_similarity"] is None else f"{row['expert_similarity']:.3f}"]
        lines.append(f"| {label} | {_method(row)} | {row['num_experts']} | {row['r']} | "
                     f"{row['mean_loss']:.3f} | " + " | ".join(f"{cos[g]:+.3f}" for g in COSINES) + " | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("analyses", nargs="+", metavar="[LABEL=]PATH",
                        help="`asymlora analyze` output dirs (or their analysis.json)")
    parser.add_argument("--out", required=True, help="dir for <name>.json and <name>.md")
    parser.add_argument("--name", default="analysis_summary", help="file name stem (default: analysis_summary)")
    args = parser.parse_args(argv)
    adapters: dict[str, dict[str, Any]] = {}
    try:
        for argument in args.analyses:
            label, path, data = load(argument)
            if label in adapters:
                raise DataError(f"{path}: a second analysis labelled {label!r}")
            adapters[label] = summarize(data)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = markdown(adapters)
    write_json_and_markdown(args.out, args.name, {"adapters": adapters}, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
