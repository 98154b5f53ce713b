"""`asymlora <command>`: the command-line entry point.

Each feature module that offers commands defines ``register_cli(subparsers)``, which adds its
sub-parsers and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an
exit code) on each. This module only lists those modules, so a command's code lives next to the
feature it drives.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from asymlora import __version__
from asymlora.errors import AsymLoraError

# Modules whose ``register_cli`` adds sub-commands, in the order they appear in ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "asymlora.assets",
    "asymlora.datasets",
    "asymlora.zoo",
    "asymlora.train",
    "asymlora.align",
    "asymlora.analyze.run",
    "asymlora.evaluate.run",
    "asymlora.model_cli",
    "asymlora.tiny",
    "asymlora.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymlora",
        description=(
            "Asymmetric LoRA for multimodal LLMs: one shared down-projection A, a bank of "
            "up-projections B_1..B_E chosen per task and/or by a learned router."
        ),
    )
    parser.add_argument("--version", action="version", version=f"asymlora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AsymLoraError as err:
        print(f"asymlora {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
