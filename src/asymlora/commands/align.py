"""`asymlora align`: stage-1 alignment of the default model's projector."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from asymlora import align
from asymlora.default_model.build import SHIPPED_PROJECTOR


def _cli(args: argparse.Namespace) -> int:
    align.run_align(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              per_dataset=args.per_dataset, out=Path(args.out), output_dir=Path(args.output_dir),
              model_path=args.model, init=args.init)
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("align", help="stage-1 alignment: train the default model's projector on captions",
                                   description=align.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="projector learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of data selection, prompts and training")
    parser.add_argument("--per-dataset", type=int, default=2000, help="caption pairs per built-in dataset")
    parser.add_argument("--model", default="default", help="'default' or a local LLaVA-style model dir")
    parser.add_argument("--init", help="projector safetensors to start from (default: the build's random projector)")
    parser.add_argument("--out", default=str(SHIPPED_PROJECTOR), help="projector safetensors to write")
    parser.add_argument("--output-dir", default="runs/align", help="training run directory (checkpoints, logs)")
    parser.set_defaults(func=_cli)
