"""`asymlora train CONFIG.yaml [key=value ...]`: multi-task visual instruction tuning on HF Trainer."""

from __future__ import annotations

import argparse
from typing import Any

from asymlora.errors import NonFiniteLossError
from asymlora.train import config as train_config

# The help shows the config schema as train/config.py documents it (its docstring after the first line).
TRAIN_HELP = train_config.__doc__.split("\n", 2)[2]


def _cli_train(args: argparse.Namespace) -> int:
    from asymlora.train import TrainConfig, run_training
    from asymlora.train.distributed import end_processes, exit_without_teardown

    config = TrainConfig.load(args.config, args.overrides)
    finished, code = False, 1
    try:
        run_training(config, resume=args.resume)
        finished, code = True, 0
    except NonFiniteLossError as err:
        print(f"asymlora train: {err}")
    finally:
        ended = end_processes(finished)
    if ended:  # a rank of a distributed run: leave before interpreter finalization
        exit_without_teardown(code)
    return code


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train an adapter on a data mixture (HF Trainer; works under accelerate launch)",
        description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="training config YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config values, e.g. training.max_steps=100 adapter.r=16")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="resume from the last checkpoint in output_dir, or from PATH")
    parser.set_defaults(func=_cli_train)
