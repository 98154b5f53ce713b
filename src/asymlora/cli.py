"""`asymlora <command>`: the command-line entry point.

Each module of :mod:`asymlora.commands` defines ``register_cli(subparsers)`` (or several
``register_*_cli``), which adds its sub-parsers and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code) on each. Command modules import the library; the
library never imports them.

Exit codes (:data:`EXIT_USER_ERROR`): 0 success; 2 a user mistake (bad arguments, config, data, paths,
checkpoints, an operation that does not exist for this adapter), printed as one line without a traceback;
1 any other failure (a run that failed, e.g. a non-finite loss, or an unexpected exception, which prints
its traceback). ``--debug`` or ``ASYMLORA_DEBUG=1`` prints the traceback of user mistakes too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from asymlora import __version__
from asymlora.errors import AsymLoraError, NonFiniteLossError

# (module, function) pairs that add sub-commands, in the order they appear in ``--help``.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("asymlora.commands.setup", "register_cli"),
    ("asymlora.commands.data", "register_cli"),
    ("asymlora.commands.models", "register_default_cli"),
    ("asymlora.commands.train", "register_cli"),
    ("asymlora.commands.align", "register_cli"),
    ("asymlora.commands.analyze", "register_cli"),
    ("asymlora.commands.evaluate", "register_cli"),
    ("asymlora.commands.adapter", "register_cli"),
    ("asymlora.commands.inference", "register_cli"),
    ("asymlora.commands.models", "register_tiny_cli"),
    ("asymlora.commands.demo", "register_cli"),
)

EXIT_USER_ERROR = 2  # argparse's own exit code for usage errors; every other user mistake gets it too
EXIT_FAILURE = 1
# OSErrors that a path given by the user causes (a file where a directory is expected, or the reverse).
PATH_ERRORS = (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
EPILOG = f"""exit codes: 0 success; {EXIT_USER_ERROR} a user mistake (arguments, config, data, paths, checkpoints,
an operation this adapter does not support), printed as one line; {EXIT_FAILURE} any other failure (a run that
failed, or an unexpected error, printed with its traceback). --debug or ASYMLORA_DEBUG=1 prints the traceback of
user mistakes too. See docs/reliability.md."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymlora",
        description=(
            "Asymmetric LoRA for multimodal LLMs: one shared down-projection A, a bank of "
            "up-projections B_1..B_E chosen per task and/or by a learned router."
        ),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"asymlora {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of every error (also: "
                        "ASYMLORA_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, function in COMMANDS:
        getattr(importlib.import_module(module), function)(subparsers)
    for command in subparsers.choices.values():  # `asymlora train --debug CONFIG` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of every error (also: ASYMLORA_DEBUG=1)")
    return parser


def _user_error(err: BaseException) -> str | None:
    """The one-line message of an exception caused by the user's input, or None for any other (a bug)."""
    if isinstance(err, AsymLoraError):
        return str(err)
    if isinstance(err, NotImplementedError) and str(err):  # an operation that does not exist (merge a router)
        return str(err)
    if isinstance(err, PATH_ERRORS) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        if args.debug or os.environ.get("ASYMLORA_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"asymlora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(err, NonFiniteLossError) else EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
