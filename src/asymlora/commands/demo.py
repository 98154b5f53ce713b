"""`asymlora demo`: the main job on the offline default model, start to finish."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from asymlora import demo


def _demo(args: argparse.Namespace) -> int:
    demo.run_demo(steps=args.steps, batch_size=args.batch_size, eval_samples=args.eval_samples, out=Path(args.out),
             seed=args.seed, config=Path(args.config) if args.config else None, model=args.model,
             max_per_split=args.max_per_split, learning_rate=args.lr)
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="the main job: set up, evaluate, fine-tune, evaluate, report",
                                   description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=demo.DEMO_STEPS, help="fine-tuning steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=demo.DEMO_BATCH, help="samples per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=demo.DEMO_LR, help="LoRA learning rate (default %(default)s)")
    parser.add_argument("--eval-samples", type=int, default=100,
                        help="test samples per task, for before, after and the shuffled control (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument("--config", help="training config (default: configs/default_asymlora.yaml)")
    parser.add_argument("--out", default="runs/demo", help="where reports, plots and the adapter go")
    parser.add_argument("--model", default="default", help="'default' (the offline MLLM) or 'tiny' / a local dir "
                        "(a quick check of the pipeline; no projector alignment)")
    parser.add_argument("--max-per-split", type=int, help="build the datasets with at most this many samples "
                        "per split (default: full size)")
    parser.set_defaults(func=_demo)
