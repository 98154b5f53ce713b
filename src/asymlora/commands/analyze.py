"""`asymlora analyze`: task-conflict analysis of a trained (or freshly initialised) adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from asymlora.analyze import run as analysis
from asymlora.io import check_output_dir
from asymlora.quantization import add_quantization_argument, quantization_argument


def _cli_analyze(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    result = analysis.run_analysis(args.out, adapter=args.adapter, config=args.config, model=args.model,
                          mixture=args.mixture, tasks=args.tasks, split=args.split,
                          samples_per_task=args.samples_per_task, batch_size=args.batch_size,
                          max_length=args.max_length, seed=args.seed, dtype=args.dtype,
                          quantization=quantization_argument(args.quantization))
    print(Path(args.out, "analysis.md").read_text(encoding="utf-8"))
    names = ["analysis.json", "analysis.md", "grad_cosine.png"]
    if result.get("routing_stats"):
        names += ["expert_load.png", "routing_entropy.png"]
    print("wrote " + ", ".join(str(Path(args.out) / n) for n in names))
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "analyze", help="task-conflict analysis: gradient cosines on A vs B, expert load, routing entropy",
        description=analysis.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="a trained adapter dir (written by `asymlora train`)")
    source.add_argument("--config", help="a training config: analyse a freshly initialised adapter")
    parser.add_argument("--model", default=None, help="the base model: 'default', 'tiny' or a local Hugging Face "
                        "model dir (default: the adapter's or config's training model)")
    parser.add_argument("--mixture", help="mixture whose tasks are compared (default: the training mixture, "
                        "else mix5)")
    parser.add_argument("--tasks", nargs="+", help="tasks to compare (default: the mixture's tasks that the "
                        "adapter knows)")
    parser.add_argument("--split", help="train | val | test (default: val when every task has one, else train)")
    parser.add_argument("--samples-per-task", type=int, default=32, help="samples per task (seeded random)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per forward/backward pass")
    parser.add_argument("--max-length", type=int, help="token limit (default: the training config's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample choice")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype to load the base model in")
    add_quantization_argument(parser, "the training config's model.quantization, else a float base")
    parser.add_argument("--out", required=True, help="output dir: analysis.json, analysis.md, *.png")
    parser.set_defaults(func=_cli_analyze)
