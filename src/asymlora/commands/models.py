"""`asymlora build-default` and `asymlora build-tiny`: write the offline default model or a tiny random one."""

from __future__ import annotations

import argparse
from typing import Any

from asymlora import tiny
from asymlora.default_model import build as default_build
from asymlora.default_model.build import (
    DEFAULT_OPTIONS,
    build_default,
    default_model_dir,
    read_manifest,
    verify_build,
)

BUILD_HELP = default_build.__doc__


def _cli_build(args: argparse.Namespace) -> int:
    if args.verify:
        manifest = verify_build(args.out)
        print(f"{args.out or default_model_dir()}: {len(manifest['files'])} files match the manifest "
              f"({manifest['parameters']['total']:,} parameters)")
        return 0
    path = build_default(args.out, force=args.force, image_size=args.image_size,
                         vision_feature_layer=args.vision_feature_layer,
                         vision_feature_select_strategy=args.vision_feature_select_strategy,
                         default_system_prompt=args.default_system_prompt)
    manifest = read_manifest(path) or {}
    counts = manifest.get("parameters", {})
    print(f"{path}  ({counts.get('total', 0):,} parameters: language model {counts.get('language_model', 0):,}, "
          f"vision tower {counts.get('vision_tower', 0):,}, projector {counts.get('multi_modal_projector', 0):,})")
    return 0


def register_default_cli(subparsers: Any) -> None:
    """Add ``asymlora build-default``."""
    parser = subparsers.add_parser(
        "build-default",
        help="assemble the offline default LLaVA (DINOv2-S + projector + SmolLM2-135M-Instruct) and cache it",
        description=BUILD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: {default_model_dir()}, i.e. $ASYMLORA_CACHE/models/default)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build is there")
    parser.add_argument("--verify", action="store_true",
                        help="do not build: check an existing build's files (sha256) and tensor shapes "
                             "against its manifest")
    parser.add_argument("--image-size", type=int, default=DEFAULT_OPTIONS["image_size"],
                        help="image side in pixels, a multiple of 14 (default %(default)s: 36 image tokens)")
    parser.add_argument("--default-system-prompt", action="store_true",
                        help="keep SmolLM2's default system turn in the chat template (default: removed)")
    parser.add_argument("--vision-feature-layer", type=int, default=DEFAULT_OPTIONS["vision_feature_layer"],
                        help="DINOv2 hidden state fed to the projector (default %(default)s; middle layers are "
                             "more semantic than the saliency-tuned last one)")
    parser.add_argument("--vision-feature-select-strategy", choices=("default", "full"),
                        default=DEFAULT_OPTIONS["vision_feature_select_strategy"],
                        help="'default' drops the CLS feature, 'full' keeps it (default %(default)s)")
    parser.set_defaults(func=_cli_build)


def _cli_tiny(args: argparse.Namespace) -> int:
    print(f"tiny random LLaVA written to {tiny.build_tiny(args.out, args.seed)}")
    return 0


def register_tiny_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("build-tiny", help="write a tiny random LLaVA + processor (smoke tests)",
                                   description=tiny.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.set_defaults(func=_cli_tiny)
