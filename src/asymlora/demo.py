"""`asymlora demo`: the main job on the offline default (fine-tune, evaluate, report).

Until the training and evaluation pieces land, it reports what is available and what is missing.
"""

from __future__ import annotations

import argparse
from typing import Any

from asymlora.assets import ASSETS, locate


def _demo(args: argparse.Namespace) -> int:
    print("asymlora demo: fine-tune the default model with AsymLoRA-MoE on mix5, evaluate before/after.")
    print("offline assets:")
    for name, asset in ASSETS.items():
        print(f"  {name:9s} {'installed' if locate(name) else 'missing (asymlora setup --only ' + name + ')'}"
              f"  {asset.purpose}")
    print("not available yet: `asymlora train` (issue: training) and `asymlora eval` (issue: evaluation) "
          "are not implemented in this version, so the demo cannot run the fine-tuning and the evaluation.")
    return 2


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="the main job on the offline default (README's first command)")
    parser.set_defaults(func=_demo)
