"""`asymlora merge`, `asymlora export`, `asymlora params`: commands on a trained adapter.

``merge`` and ``export`` write their output directory atomically (:func:`asymlora.io.replacing_dir`): into a
hidden temporary dir beside ``--out``, renamed in once complete; ``--force`` replaces an existing output
only then. A SIGKILL at any moment leaves ``--out`` as it was or complete; what an interrupted attempt left
beside it is cleaned by the next one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from asymlora.errors import ConfigError


def _copy_processor_files(model_dir: Path, out: Path) -> None:
    for pattern in ("tokenizer*", "special_tokens_map.json", "chat_template.*", "*processor*.json",
                    "preprocessor_config.json", "generation_config.json", "vocab.*", "merges.txt"):
        for path in model_dir.glob(pattern):
            if path.is_file() and not (out / path.name).exists():
                shutil.copy2(path, out / path.name)


def _checked_manifest(adapter: str, what: str) -> dict[str, Any]:
    """The adapter's manifest, after refusing a router-gated adapter (before any model is loaded)."""
    from asymlora.persistence import read_adapter_config
    from asymlora.serving import check_fixed_routing

    _, manifest = read_adapter_config(adapter)
    check_fixed_routing(manifest.get("layers") or {}, what)
    return manifest


def _recorded_quantization(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization of the base the adapter was trained on, as its adapter_config.json records it."""
    return (manifest.get("base_model") or {}).get("quantization")


def _load(args: argparse.Namespace, quantization: dict[str, Any] | None = None) -> Any:
    import asymlora
    from asymlora.loading import load_base_model, resolve_model_dir

    base = load_base_model(resolve_model_dir(args.model), quantization=quantization)
    return asymlora.load(base, args.adapter, is_trainable=False)


def _save_base(model: Any, model_dir: Path, out: Path) -> None:
    """Save the HF model inside ``model`` (asymlora layers swapped back for their base layers: merged ones
    hold the merged weights, the others the base weights) with the processor files of ``model_dir``."""
    _unwrap(model).save_pretrained(out)
    _copy_processor_files(model_dir, out)


def _unwrap(model: Any) -> Any:
    """Swap each AsymLoraLinear back for its base layer and return the HF model."""
    base = model.base_model
    for name, layer in model.adapter_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, layer.base_layer)
    return base


def _merge(args: argparse.Namespace) -> int:
    from asymlora.io import check_output_dir, replacing_dir
    from asymlora.loading import resolve_model_dir
    from asymlora.quantization import dequantize_model

    out = Path(args.out)
    check_output_dir(out, "--out", force=args.force)
    model_dir = resolve_model_dir(args.model)
    if args.projector_only:
        model = _load(args)
        if not model.saved_modules:
            raise ConfigError(f"--projector-only: {args.adapter} trains no modules_to_save (e.g. the projector); the "
                              "base model would be written unchanged")
        with replacing_dir(out, args.force) as tmp:
            _save_base(model, model_dir, tmp)  # unmerged: base weights, trained modules_to_save
        print(f"wrote the base model with the trained {', '.join(model.saved_modules)} to {out}")
        return 0
    quantization = _recorded_quantization(_checked_manifest(args.adapter, "merge"))
    if quantization and not args.dequantize:
        raise ConfigError(f"merge: {args.adapter} was trained on a {quantization['bits']}-bit base (bitsandbytes); "
                          "its weights are integers that W + s*B*A cannot be folded into: add --dequantize to write "
                          "a float model (the dequantized base weights with the adapter folded in)")
    model = _load(args, quantization)
    if quantization:
        dequantize_model(model.base_model)
    model.merge(task=_task(args.task))
    with replacing_dir(out, args.force) as tmp:
        _save_base(model, model_dir, tmp)
    print(f"merged task {args.task!r} into {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from asymlora.io import check_output_dir, replacing_dir

    out = Path(args.out)
    check_output_dir(out, "--out", force=args.force)
    if args.all_tasks:
        return _export_all_tasks(args, out)
    quantization = _recorded_quantization(_checked_manifest(args.adapter, "export"))
    model = _load(args, quantization if _has_bitsandbytes() else None)  # only the structure matters
    with replacing_dir(out, args.force) as tmp:
        model.export_peft(tmp, task=_task(args.task))
    print(f"wrote a PEFT LoRA adapter for task {args.task!r} to {out}")
    return 0


def _export_all_tasks(args: argparse.Namespace, out: Path) -> int:
    from asymlora.io import replacing_dir, write_text_atomic
    from asymlora.loading import resolve_model_dir
    from asymlora.serving import (
        BASE_DIR,
        check_task_dirs,
        serving_readme,
        write_task_adapters,
    )

    if args.task is not None:
        raise ConfigError("--task: not with --all-tasks (every task is exported)")
    _checked_manifest(args.adapter, "export --all-tasks")
    model = _load(args)  # a float base: base/ must be a float model
    with_base = bool(model.saved_modules)
    check_task_dirs(list(model.tasks), with_base)
    model_dir = resolve_model_dir(args.model)
    ranks = {layer.spec.r for layer in model.adapter_layers.values()}
    with replacing_dir(out, args.force) as tmp:
        tasks = write_task_adapters(model, tmp, with_saved_modules=not with_base,
                                    base_model_name=str(model_dir))
        if with_base:
            _save_base(model, model_dir, tmp / BASE_DIR)
        write_text_atomic(tmp / "README.md", serving_readme(
            tasks, str(args.model), with_base, str(args.adapter), list(model.adapter_layers), max(ranks)))
    print(f"wrote {len(tasks)} PEFT LoRA adapters ({', '.join(tasks)}){' and base/' if with_base else ''} "
          f"and README.md to {out}")
    return 0


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _params(args: argparse.Namespace) -> int:
    import asymlora
    from asymlora.loading import load_base_model, resolve_model_dir

    base = load_base_model(resolve_model_dir(args.model))
    if args.adapter:
        model = asymlora.load(base, args.adapter)
    else:
        model = asymlora.get_model(base, asymlora.AsymLoraConfig.from_file(args.config))
    report = asymlora.param_report(model)
    print(json.dumps(report, indent=2) if args.json else asymlora.format_param_report(report))
    return 0


def _task(value: str | None) -> str | int | None:
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def register_cli(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="the base model: 'default', 'tiny' or a local Hugging Face model directory")
    common.add_argument("--adapter", required=True, help="asymlora adapter directory (adapter_config.json + "
                        "adapter_model.safetensors)")
    common.add_argument("--task", help="task name (or id) whose B head to use; needed when E > 1")
    common.add_argument("--out", required=True, help="output directory, written atomically (a hidden temporary "
                        "dir beside it, renamed in once complete)")
    common.add_argument("--force", action="store_true", help="replace a non-empty --out (once the new output "
                        "is complete)")

    merge = subparsers.add_parser(
        "merge", parents=[common], help="fold the adapter (for one task) into the base weights",
        description="Fold W + s*B_t*A into the base weights and save a plain HF model. Only layers whose gate "
        "is fixed given the task (lora, task routing) can be merged; router-gated adapters are refused. An "
        "adapter trained on a quantized base (model.quantization) is refused unless --dequantize.",
    )
    merge.add_argument("--dequantize", action="store_true", help="for an adapter trained on a bitsandbytes 4/8-bit "
                       "base: load the base quantized as in training, dequantize its weights to float32 and fold "
                       "the adapter in (a float model whose outputs match the adapted quantized model's)")
    merge.add_argument("--projector-only", action="store_true", help="write the base model with only the trained "
                       "modules_to_save (e.g. the projector) in it, no LoRA folded in: the base that per-task LoRA "
                       "adapters are served on (export --all-tasks writes it as base/)")
    merge.set_defaults(func=_merge)

    export = subparsers.add_parser(
        "export", parents=[common], help="write standard PEFT LoRA adapters: one task, or every task",
        description="Write adapter_config.json + adapter_model.safetensors in PEFT's LoRA format (A copied, "
        "B = the task's head) that peft.PeftModel.from_pretrained loads. With --all-tasks: DIR/<task>/ for every "
        "task, DIR/base/ (the base with the trained modules_to_save, which vLLM does not load from a LoRA) when "
        "the adapter trained any, and DIR/README.md with the vLLM and PEFT commands that serve them together.",
    )
    export.add_argument("--all-tasks", action="store_true", help="export every task into --out/<task>/, with "
                        "base/ and README.md (how to serve them with vLLM and PEFT)")
    export.set_defaults(func=_export)

    params = subparsers.add_parser("params", help="trainable parameters per role and module kind")
    params.add_argument("--model", required=True, help="the base model: 'default', 'tiny' or a local Hugging Face model directory")
    group = params.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", help="an adapter directory to report on")
    group.add_argument("--config", help="an AsymLoraConfig YAML/JSON to report on (nothing is trained)")
    params.add_argument("--json", action="store_true", help="print JSON instead of a table")
    params.set_defaults(func=_params)
