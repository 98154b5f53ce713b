"""Move the built default model to a machine that has no package registry, in fewer bytes than its checkpoint.

``asymlora build-default`` writes a 629 MB float32 checkpoint from two source files (the SmolLM2 GGUF,
98 MB, and the DINOv2 ONNX graph, 97 MB). A GPU machine reached through a small per-call transfer (the
``device`` tool carries 64 MiB a call) can neither download those packages nor take the checkpoint in
one piece. This script splits the build into

- the GGUF file itself (the language model, dequantised on arrival exactly as the build does it:
  ``asymlora.default_model.smollm2.load_smollm2``), and
- ``rest.safetensors``: every tensor of the built checkpoint that the GGUF does not reproduce bit for
  bit (vision tower, projector, the image-token row of the embedding), the vision tower's matrices in
  float16 (``--vision-dtype``; 44 MB instead of 88 MB; its vectors, norms, layer scales and position
  embeddings stay float32), plus the small files (config, tokenizer, processor,
  chat template, manifest),

and ``unpack`` puts the float32 checkpoint back together. The language model comes back bit-identical;
the vision tower's weight matrices are rounded to float16 once (relative error <= 2**-11 for normal
values), which a bfloat16 run rounds
further anyway. ``unpack`` writes ``unpacked.json`` beside the model saying so, and the manifest's file
sizes still match, so ``asymlora`` loads the directory as the default model
(``ASYMLORA_CACHE=<dir>`` with the model in ``<dir>/models/default``).

    python benchmarks/pack_default.py pack --out /tmp/pack              # here
    tar + split into parts; carry them; cat them together there         # see docs/benchmarks.md
    python benchmarks/pack_default.py unpack /tmp/pack --out $ASYMLORA_CACHE/models/default   # there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asymlora.default_model.build import default_model_dir, read_manifest
from asymlora.default_model.smollm2 import load_smollm2

LM_PREFIX = "language_model."  # built key "language_model.model.layers.0..." = GGUF model key "model.layers.0..."
WEIGHTS = "model.safetensors"
REST = "rest.safetensors"
GGUF = "smollm2.gguf"
ROWS_SUFFIX = ".__extra_rows__"  # an embedding that grew by new tokens: only the new rows are stored


def _lm_state(gguf: Path) -> dict[str, torch.Tensor]:
    model, _ = load_smollm2(gguf, dtype=torch.float32)
    return {LM_PREFIX + k: v for k, v in model.state_dict().items()}


def split_state(built: dict[str, torch.Tensor], lm: dict[str, torch.Tensor],
                vision_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of ``built`` that ``lm`` does not reproduce bit for bit, and how many it does.

    A tensor that is ``lm``'s with rows appended (an embedding grown by new tokens) keeps only the new rows,
    under ``key + ROWS_SUFFIX``; the vision tower's floating matrices are cast to ``vision_dtype``.
    """
    rest: dict[str, torch.Tensor] = {}
    kept = 0
    for key, value in built.items():
        ref = lm.get(key)
        if ref is not None and ref.shape == value.shape and torch.equal(ref, value):
            kept += 1
            continue
        if ref is not None and ref.dim() == value.dim() and value.shape[1:] == ref.shape[1:] \
                and value.shape[0] > ref.shape[0] and torch.equal(value[: ref.shape[0]], ref):
            rest[key + ROWS_SUFFIX] = value[ref.shape[0]:].contiguous()
            continue
        if key.startswith("vision_tower.") and value.is_floating_point() and value.dim() >= 2:
            value = value.to(vision_dtype)
        rest[key] = value.contiguous()
    return rest, kept


def merge_state(rest: dict[str, torch.Tensor], lm: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_state`: ``keys`` in order, float32, from ``rest`` where it has them (new rows
    appended to ``lm``'s tensor), else from ``lm``."""
    state: dict[str, torch.Tensor] = {}
    for key, value in rest.items():
        if key.endswith(ROWS_SUFFIX):
            base = key.removesuffix(ROWS_SUFFIX)
            state[base] = torch.cat([lm[base], value.float()])
        else:
            state[key] = value.float()
    missing = [key for key in keys if key not in state and key not in lm]
    if missing:
        raise SystemExit(f"the pack lacks {len(missing)} tensor(s) of the build, e.g. {missing[:3]}")
    return {key: (state[key] if key in state else lm[key]).contiguous() for key in keys}


def pack(model_dir: Path, gguf: Path, out: Path, vision_dtype: torch.dtype) -> dict[str, int]:
    """Write ``out/{smollm2.gguf, rest.safetensors, small files}``; returns byte counts."""
    built = load_file(model_dir / WEIGHTS)
    rest, kept = split_state(built, _lm_state(gguf), vision_dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(rest, str(out / REST), metadata={"vision_dtype": str(vision_dtype).removeprefix("torch."),
                                                    "keys": json.dumps(list(built))})
    shutil.copyfile(gguf, out / GGUF)
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.name != WEIGHTS:
            shutil.copyfile(p, out / p.name)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print(f"{kept} tensors come from the GGUF, {len(rest)} are in {REST}; bytes: {sizes}")
    return sizes


def unpack(packed: Path, out: Path) -> Path:
    """Rebuild ``out/model.safetensors`` (float32, the built key order and header) and the small files."""
    manifest = read_manifest(packed)
    if manifest is None:
        raise SystemExit(f"{packed}: no manifest.json; pack it with `pack_default.py pack`")
    with safe_open(packed / REST, "pt") as f:
        metadata = f.metadata() or {}
    vision_dtype, keys = metadata.get("vision_dtype", "float32"), json.loads(metadata["keys"])
    state = merge_state(load_file(packed / REST), _lm_state(packed / GGUF), keys)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.unpacking-"))
    building.chmod(0o755)
    save_file(state, str(building / WEIGHTS), metadata={"format": "pt"})
    for p in sorted(packed.iterdir()):
        if p.is_file() and p.name not in (REST, GGUF):
            shutil.copyfile(p, building / p.name)
    size = (building / WEIGHTS).stat().st_size
    expected = manifest["files"][WEIGHTS]["bytes"]
    if size != expected:
        shutil.rmtree(building)
        raise SystemExit(f"unpacked {WEIGHTS} has {size} bytes, the manifest says {expected}")
    (building / "unpacked.json").write_text(json.dumps(
        {"from": str(packed), "vision_tower_rounded_to": vision_dtype,
         "language_model": "dequantised from the GGUF, bit-identical to the build"}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(building, out)
    print(f"unpacked the default model into {out} ({size} bytes; vision tower via {vision_dtype})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="split the built default model into the GGUF + the rest")
    p.add_argument("--model", type=Path, default=None, help="built model (default: the cached default model)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vision-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    u = sub.add_parser("unpack", help="rebuild the float32 checkpoint from a pack")
    u.add_argument("packed", type=Path)
    u.add_argument("--out", type=Path, default=None, help="default: the cached default model's place")
    args = parser.parse_args(argv)
    if args.command == "pack":
        model_dir = args.model or default_model_dir()
        manifest = read_manifest(model_dir)
        if manifest is None:
            raise SystemExit(f"{model_dir}: not a build of asymlora build-default (no manifest.json)")
        pack(model_dir, Path(manifest["sources"]["smollm2"]["path"]), args.out, getattr(torch, args.vision_dtype))
    else:
        unpack(args.packed, args.out or default_model_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
