"""Where an emoji caption's score goes: format, category, subgroup and degenerate loops, per evaluated run.

The built-in emoji task's captions follow one template, ``"<name>, a <subgroup> emoji from the <category>
category."``, and ROUGE-L scores them as a whole. This script splits a run's emoji predictions
(``predictions.jsonl`` of ``asymlora eval``) into what ROUGE-L mixes: the share of predictions in the
template's format, the share that name the reference's category (one of 9 Unicode groups) and its subgroup,
the ROUGE-L of the emoji's own name (the text before ``", a <subgroup> emoji"``; 0 for a caption out of the
format), and the share that loop (12 or more words, fewer than half of them distinct). It also gives the
majority-category baseline of the items, so "names the category" can be read against always answering the
most frequent one.

    python benchmarks/caption_parts.py runs/quality/cpu_mix5_500steps_all/mixed-*-s1/eval \\
        --out runs/caption_parts/cpu_mix5_500steps_all

writes ``caption_parts.json`` and ``caption_parts.md`` under ``--out``. ``--max-items-per-task 200`` reads only
each run's first 200 emoji items, so that an all-items eval and a ``--max-samples 200`` one are compared on the
same items.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from asymlora.errors import DataError
from asymlora.evaluate.metrics.builtin import rouge_l
from asymlora.evaluate.paired import read_predictions
from asymlora.io import write_json_and_markdown

TEMPLATE = re.compile(r", an? (?P<subgroup>.+?) emoji from the (?P<category>.+?) category")
TASK = "emoji"


class Caption(NamedTuple):
    name: str
    subgroup: str
    category: str


def parts(text: str) -> Caption | None:
    """The name, subgroup and category of a caption in the template's format, else None."""
    match = TEMPLATE.search(text)
    return Caption(text[:match.start()].strip(), match["subgroup"], match["category"]) if match else None


def loops(text: str) -> bool:
    words = text.split()
    return len(words) >= 12 and len(set(words)) < len(words) / 2


def read_emoji(run: str | Path, max_items: int | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The emoji rows of a run's ``predictions.jsonl`` (the run dir or the file); with ``max_items``, the first
    that many (the items of an eval with ``--max-samples max_items``)."""
    if max_items is not None and max_items < 1:
        raise DataError(f"--max-items-per-task: {max_items} must be at least 1")
    path, lines = read_predictions(run)
    rows: list[dict[str, Any]] = []
    for line_no, row in lines:
        if row.get("task") != TASK or (max_items is not None and len(rows) >= max_items):
            continue
        try:
            rows.append({"id": row["id"], "prediction": str(row["prediction"]), "reference": str(row["reference"]),
                         "score": float(row["score"])})
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}, line {line_no}: expected 'id', 'prediction', 'reference' and a numeric "
                            f"'score' ({error})") from None
    if not rows:
        raise DataError(f"{path}: no predictions of task {TASK!r}")
    return path, rows


def summarize(rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """Shares of the run's emoji predictions in format, naming the category / subgroup, looping; the names'
    ROUGE-L."""
    gold = []
    for row in rows:
        found = parts(row["reference"])
        if found is None:
            raise DataError(f"{path}: reference of item {row['id']!r} is not in the emoji caption template "
                            f"({row['reference']!r})")
        gold.append(found)
    predicted = [parts(row["prediction"]) for row in rows]
    n = len(rows)
    categories = Counter(g.category for g in gold)
    return {
        "items": n,
        "rouge_l": statistics.mean(row["score"] for row in rows),
        "format": sum(p is not None for p in predicted) / n,
        "category": sum(p is not None and p.category == g.category for p, g in zip(predicted, gold)) / n,
        "subgroup": sum(p is not None and p.subgroup == g.subgroup for p, g in zip(predicted, gold)) / n,
        "name_rouge_l": statistics.mean(0.0 if p is None else rouge_l(p.name, g.name) for p, g in zip(predicted, gold)),
        "loops": sum(loops(row["prediction"]) for row in rows) / n,
        "majority_category": categories.most_common(1)[0][1] / n,
        "predicted_categories": dict(Counter(p.category for p in predicted if p is not None).most_common()),
    }


def markdown(table: dict[str, dict[str, Any]]) -> str:
    first = next(iter(table.values()))
    lines = [f"Emoji captions split into the template's parts ({first['items']} items; always answering the most "
             f"frequent category would name it for {first['majority_category']:.3f}).", "",
             "| run | ROUGE-L | in format | names the category | names the subgroup | name's ROUGE-L | loops "
             "| most predicted category |",
             "|---|---|---|---|---|---|---|---|"]
    for run, row in table.items():
        top = next(iter(row["predicted_categories"].items()), ("", 0))
        lines.append(f"| {run} | {row['rouge_l']:.3f} | {row['format']:.3f} | {row['category']:.3f} | "
                     f"{row['subgroup']:.3f} | {row['name_rouge_l']:.3f} | {row['loops']:.3f} | "
                     f"{top[0]} ({top[1] / row['items']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="`asymlora eval` output dirs (or their predictions.jsonl)")
    parser.add_argument("--out", required=True, help="dir for caption_parts.json and caption_parts.md")
    parser.add_argument("--max-items-per-task", type=int, metavar="N",
                        help="only the first N emoji items of each run (compares an all-items eval with an "
                        "`asymlora eval --max-samples N` one on the same items)")
    args = parser.parse_args(argv)
    table: dict[str, dict[str, Any]] = {}
    try:
        for run in args.runs:
            path, rows = read_emoji(run, args.max_items_per_task)
            name = path.parent.name if path.name == "predictions.jsonl" else path.stem
            if name in table:
                raise DataError(f"{path}: a second run named {name!r}")
            table[name] = summarize(rows, path)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = markdown(table)
    write_json_and_markdown(args.out, "caption_parts", table, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
