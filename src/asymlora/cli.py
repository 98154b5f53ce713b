"""`asymlora <command>`: the command-line entry point.

Each module of :mod:`asymlora.commands` defines ``register_cli(subparsers)`` (or several
``register_*_cli``), which adds its sub-parsers and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code) on each. Command modules import the library; the
library never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from asymlora import __version__
from asymlora.errors import AsymLoraError

# (module, function) pairs that add sub-commands, in the order they appear in ``--help``.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("asymlora.commands.setup", "register_cli"),
    ("asymlora.commands.data", "register_cli"),
    ("asymlora.commands.models", "register_default_cli"),
    ("asymlora.commands.train", "register_cli"),
    ("asymlora.commands.align", "register_cli"),
    ("asymlora.commands.analyze", "register_cli"),
    ("asymlora.evaluate.run", "register_cli"),
    ("asymlora.commands.adapter", "register_cli"),
    ("asymlora.commands.inference", "register_cli"),
    ("asymlora.commands.models", "register_tiny_cli"),
    ("asymlora.demo", "register_cli"),
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
    for module, function in COMMANDS:
        getattr(importlib.import_module(module), function)(subparsers)
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
