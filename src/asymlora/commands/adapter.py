"""`asymlora merge`, `asymlora export`, `asymlora params`: commands on a trained adapter."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from asymlora.errors import ConfigError
from asymlora.io import check_output_dir


def _copy_processor_files(model_dir: Path, out: Path) -> None:
    for pattern in ("tokenizer*", "special_tokens_map.json", "chat_template.*", "*processor*.json",
                    "preprocessor_config.json", "generation_config.json", "vocab.*", "merges.txt"):
        for path in model_dir.glob(pattern):
            if path.is_file() and not (out / path.name).exists():
                shutil.copy2(path, out / path.name)


def _merge(args: argparse.Namespace) -> int:
    import asymlora
    from asymlora.loading import load_base_model, resolve_model_dir

    out = check_output_dir(args.out, "--out")
    base = load_base_model(resolve_model_dir(args.model))
    model = asymlora.load(base, args.adapter, is_trainable=False)
    model.merge(task=_task(args.task))
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"--out {out}: exists and is not empty (use --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        # The merged weights replace the base layers: save the plain HF model without wrappers.
        merged = _unwrap_merged(model)
        merged.save_pretrained(tmp)
        _copy_processor_files(resolve_model_dir(args.model), Path(tmp))
        if out.exists():
            shutil.rmtree(out)
        Path(tmp).rename(out)
    print(f"merged task {args.task!r} into {out}")
    return 0


def _unwrap_merged(model: Any) -> Any:
    """Swap each merged AsymLoraLinear back for its (merged) base nn.Linear and return the HF model."""
    base = model.base_model
    for name, layer in model.adapter_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, layer.base_layer)
    return base


def _export(args: argparse.Namespace) -> int:
    import asymlora
    from asymlora.loading import load_base_model, resolve_model_dir

    check_output_dir(args.out, "--out")
    base = load_base_model(resolve_model_dir(args.model))
    model = asymlora.load(base, args.adapter, is_trainable=False)
    model.export_peft(args.out, task=_task(args.task))
    print(f"wrote a PEFT LoRA adapter for task {args.task!r} to {args.out}")
    return 0


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
    common.add_argument("--out", required=True, help="output directory")

    merge = subparsers.add_parser(
        "merge", parents=[common], help="fold the adapter (for one task) into the base weights",
        description="Fold W + s*B_t*A into the base weights and save a plain HF model. Only layers whose gate "
        "is fixed given the task (lora, task routing) can be merged; router-gated layers raise an error.",
    )
    merge.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    merge.set_defaults(func=_merge)

    export = subparsers.add_parser(
        "export", parents=[common], help="write a standard PEFT LoRA adapter for one task",
        description="Write adapter_config.json + adapter_model.safetensors in PEFT's LoRA format (A copied, "
        "B = the task's head) that peft.PeftModel.from_pretrained loads.",
    )
    export.set_defaults(func=_export)

    params = subparsers.add_parser("params", help="trainable parameters per role and module kind")
    params.add_argument("--model", required=True, help="the base model: 'default', 'tiny' or a local Hugging Face model directory")
    group = params.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", help="an adapter directory to report on")
    group.add_argument("--config", help="an AsymLoraConfig YAML/JSON to report on (nothing is trained)")
    params.add_argument("--json", action="store_true", help="print JSON instead of a table")
    params.set_defaults(func=_params)
