"""`asymlora data build` and `asymlora data list`: build the built-in datasets, show what is built."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any

from asymlora.errors import AsymLoraError


def register_cli(subparsers: Any) -> None:
    """Add the ``data`` command (sub-commands ``build`` and ``list``) to the ``asymlora`` parser."""
    from asymlora.builtin_data import BUILDERS

    names = "\n".join(f"  {b.name:8s} {b.description} [{b.source}; {b.licence}]" for b in BUILDERS.values())
    data = subparsers.add_parser(
        "data",
        help="build the built-in real datasets (LLaVA JSON + PNG) into the cache",
        description=f"The built-in datasets:\n{names}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data.set_defaults(func=functools.partial(_cli_help, data))
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    build = commands.add_parser(
        "build",
        help="build datasets (skips those already built with the same seed and sizes)",
        description="Build the built-in datasets into <out>/<name>/{train,val,test}.json, images/ and "
        "stats.json, and print counts and the majority-answer baseline of each.\n\n" + names,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "--only",
        nargs="+",
        choices=list(BUILDERS),
        metavar="NAME",
        help=f"build only these datasets (default: all of {', '.join(BUILDERS)})",
    )
    build.add_argument(
        "--seed", type=int, default=0, help="random seed of splits, sampling and rendering (default 0)"
    )
    build.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="root directory of the built datasets (default: $ASYMLORA_CACHE/data, "
        "i.e. ~/.cache/asymlora/data)",
    )
    build.add_argument(
        "--max-per-split",
        type=_positive_int,
        metavar="N",
        default=None,
        help="cap every split at N samples (for quick tests; default: the full default sizes)",
    )
    build.add_argument(
        "--force", action="store_true", help="rebuild even if an identical build is already there"
    )
    build.set_defaults(func=_cli_build)

    listing = commands.add_parser(
        "list",
        help="list the built-in datasets and whether each is built",
        description="List the built-in datasets, their sources and build state.",
    )
    listing.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="root directory of the built datasets (default: $ASYMLORA_CACHE/data)",
    )
    listing.set_defaults(func=_cli_list)


def _cli_help(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser.print_help()
    return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _table_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()


def format_table(rows: list[list[str]]) -> str:
    """Left-align the first column, right-align the others."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(_table_row(r, widths) for r in rows)


def _cli_build(args: argparse.Namespace) -> int:
    from asymlora.builtin_data import BUILDERS
    from asymlora.builtin_data.common import run_build

    names = args.only or list(BUILDERS)
    rows = [
        ["dataset", "train", "val", "test", "answers", "majority answer", "baseline", "q-baseline", "time"]
    ]
    failures = []
    start = time.perf_counter()
    for name in names:
        try:
            result = run_build(
                BUILDERS[name], args.out, seed=args.seed, max_per_split=args.max_per_split, force=args.force
            )
        except AsymLoraError as err:
            failures.append(f"{name}: {err}")
            rows.append([name, "-", "-", "-", "-", "FAILED", "-", "-", "-"])
            continue
        stats = result.stats
        counts = stats["counts"]
        majority = stats["majority_answer"]
        rows.append(
            [
                name,
                str(counts["train"]),
                str(counts["val"]),
                str(counts["test"]),
                str(stats["distinct_answers"]["train"]),
                majority if len(majority) <= 24 else majority[:21] + "...",
                f"{stats['majority_baseline']:.3f}",
                f"{stats['question_majority_baseline']:.3f}",
                "skipped" if result.skipped else f"{result.seconds:.1f}s",
            ]
        )
        print(f"{name}: {'up to date' if result.skipped else 'built'} in {result.directory}", flush=True)
    print()
    print(format_table(rows))
    print(
        f"\nbaseline: accuracy on test of always giving the majority train answer; q-baseline: the same "
        f"per question text. Total {time.perf_counter() - start:.1f}s."
    )
    for failure in failures:
        print(f"asymlora data build: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _cli_list(args: argparse.Namespace) -> int:
    from asymlora.builtin_data import BUILDERS
    from asymlora.builtin_data.common import dataset_dir, read_stats

    rows = [["dataset", "source", "licence", "built"]]
    for builder in BUILDERS.values():
        directory = dataset_dir(builder.name, args.out)
        stats = read_stats(directory)
        if stats is None:
            state = "no"
        else:
            counts = stats["counts"]
            state = f"seed {stats['build']['seed']}: {counts['train']}/{counts['val']}/{counts['test']} in {directory}"
        rows.append([builder.name, builder.source, builder.licence, state])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return 0
