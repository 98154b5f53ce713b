"""Does a retrained run repeat an earlier one? Two checks, for the reproduction notes of docs/RESULTS.md.

``answers OLD NEW``: two evals (an ``asymlora eval`` output dir or its ``predictions.jsonl``) compared on the
items both scored (by ``id``): how many predictions are identical, per task and in all, and each eval's mean
score on those items. A retraining that repeats its run gives every answer again; the items may differ in
number (an eval of the first 200 items per task against one of all items).

``adapters A B``: two training output dirs (``adapter_model.safetensors`` and ``trainer_state.json``): the
first logged step whose loss differs, and how many saved tensors differ and by how much at most. Two runs of
one config on one machine end in identical tensors (``tests/test_train.py``); a change of the float order
(another CPU instruction set, another kernel) shows up as a loss that differs from the first logged step.

    python benchmarks/repeat_check.py answers runs/evals/mixed-lora_moe-r4-s1 \\
        runs/quality/cpu_mix5_500steps_all/mixed-lora_moe-r4-s1/eval --out runs/repeat_check/lora_moe_s1
    python benchmarks/repeat_check.py adapters runs/isa/native runs/isa/avx2 --out runs/repeat_check/isa

write ``repeat_check.json`` and ``repeat_check.md`` under ``--out`` (stdout gets the markdown either way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from asymlora.errors import DataError
from asymlora.evaluate import paired
from asymlora.io import read_json, write_json_and_markdown


def read_predictions(path: str | Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """An eval dir (or its ``predictions.jsonl``) as ``{id: row}``; a bad line names the file and line."""
    path, rows = paired.read_predictions(path)
    by_id: dict[str, dict[str, Any]] = {}
    for line_no, row in rows:
        missing = [key for key in ("task", "id", "prediction") if key not in row]
        if missing:
            raise DataError(f"{path}, line {line_no}: no {missing[0]!r} field")
        by_id[str(row["id"])] = row
    return path, by_id


def compare_answers(old: str | Path, new: str | Path) -> dict[str, Any]:
    """Identical predictions on the items both evals scored, per task and in all, and each eval's mean score."""
    old_path, before = read_predictions(old)
    new_path, after = read_predictions(new)
    common = [key for key in before if key in after]
    if not common:
        raise DataError(f"{old_path} and {new_path}: no item id in common")
    tasks: dict[str, dict[str, Any]] = {}
    for key in common:
        task = tasks.setdefault(before[key]["task"], {"items": 0, "identical": 0, "score_old": 0.0, "score_new": 0.0})
        task["items"] += 1
        task["identical"] += before[key]["prediction"] == after[key]["prediction"]
        task["score_old"] += float(before[key].get("score", 0.0))
        task["score_new"] += float(after[key].get("score", 0.0))
    for task in tasks.values():
        task["score_old"] /= task["items"]
        task["score_new"] /= task["items"]
    return {"check": "answers", "old": str(old_path), "new": str(new_path), "items": len(common),
            "identical": sum(task["identical"] for task in tasks.values()), "tasks": tasks}


def _logged_losses(run: Path) -> list[tuple[int, float]]:
    state = read_json(run / "trainer_state.json", "the trainer_state.json of a training output dir")
    return [(entry["step"], entry["loss"]) for entry in state.get("log_history", []) if "loss" in entry]


def compare_adapters(first: str | Path, second: str | Path) -> dict[str, Any]:
    """The first logged step whose loss differs, and the saved tensors that differ (count, largest difference)."""
    a, b = Path(first), Path(second)
    tensors = []
    for run in (a, b):
        path = run / "adapter_model.safetensors"
        if not path.is_file():
            raise DataError(f"{path}: not found (expected a training output dir)")
        tensors.append(load_file(path))
    if tensors[0].keys() != tensors[1].keys():
        only = sorted(tensors[0].keys() ^ tensors[1].keys())
        raise DataError(f"{a} and {b}: not the same adapter (tensor {only[0]!r} is in one only)")
    differing = [key for key in tensors[0] if not torch.equal(tensors[0][key], tensors[1][key])]
    largest = max((float((tensors[0][key].float() - tensors[1][key].float()).abs().max()) for key in differing),
                  default=0.0)
    losses = list(zip(_logged_losses(a), _logged_losses(b)))
    first_differing = next((x[0] for x, y in losses if x != y), None)
    return {"check": "adapters", "a": str(a), "b": str(b), "tensors": len(tensors[0]),
            "tensors_differing": len(differing), "max_abs_difference": largest, "logged_steps": len(losses),
            "first_step_loss_differs": first_differing,
            "losses": [{"step": x[0], "a": x[1], "b": y[1]} for x, y in losses]}


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a short report."""
    if result["check"] == "answers":
        lines = [f"Answers of `{result['new']}` against `{result['old']}` on the {result['items']:,} items both "
                 f"scored: **{result['identical']:,} of {result['items']:,} identical**.", "",
                 "| task | items | identical | old mean score | new mean score |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {task['items']} | {task['identical']} | {task['score_old']:.3f} | "
                  f"{task['score_new']:.3f} |" for name, task in result["tasks"].items()]
        return "\n".join(lines) + "\n"
    step = result["first_step_loss_differs"]
    where = "no logged loss differs" if step is None else f"the logged loss first differs at step {step}"
    lines = [f"`{result['b']}` against `{result['a']}`: **{result['tensors_differing']} of {result['tensors']} "
             f"saved tensors differ** (largest difference {result['max_abs_difference']:.3g}); over "
             f"{result['logged_steps']} logged steps {where}.", ""]
    if result["losses"]:
        lines += ["| step | loss (a) | loss (b) |", "|---|---|---|"]
        lines += [f"| {row['step']} | {row['a']!r} | {row['b']!r} |" for row in result["losses"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    answers = sub.add_parser("answers", help="identical predictions of two evals on their common items")
    answers.add_argument("old")
    answers.add_argument("new")
    adapters = sub.add_parser("adapters", help="logged losses and saved tensors of two training runs")
    adapters.add_argument("a")
    adapters.add_argument("b")
    for command in (answers, adapters):
        command.add_argument("--out", type=Path, help="write repeat_check.json and .md here")
    args = parser.parse_args(argv)
    try:
        result = compare_answers(args.old, args.new) if args.check == "answers" else compare_adapters(args.a, args.b)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    markdown = to_markdown(result)
    if args.out is not None:
        write_json_and_markdown(args.out, "repeat_check", result, markdown)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
