"""Every task of an adapter as standard PEFT LoRA adapters, for engines that serve many LoRAs at once.

``asymlora export --all-tasks --out DIR`` writes ``DIR/<task>/`` per task (A copied, B = the task's head:
:func:`asymlora.merge.write_peft_adapter`), and, when the adapter trained modules_to_save (e.g. the
projector), ``DIR/base/``: the base model with those trained modules in it. vLLM loads LoRA weights only and
ignores (or rejects) modules_to_save, so the task adapters leave them out and ``DIR/base/`` carries them:
``DIR/base`` + ``DIR/<task>`` is the adapted model for that task, for vLLM and PEFT alike. ``DIR/README.md``
says how to serve them (:func:`serving_readme`).

Only adapters whose update is fixed given the task export this way (lora, task routing): a learned router
mixes the heads per token, and no serving engine applies a per-token mixture of LoRAs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from asymlora.errors import ConfigError

BASE_DIR = "base"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 512)
_TASK_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_fixed_routing(layers: dict[str, Any], what: str) -> None:
    """ConfigError naming the first layer whose gates come from a learned router (no fixed weight exists).
    ``layers``: name -> LayerSpec, or the ``layers`` manifest of an adapter_config.json (checked before any
    model is loaded)."""
    from dataclasses import fields

    from asymlora.config import LayerSpec

    for name, spec in layers.items():
        if isinstance(spec, dict):
            spec = LayerSpec(**{f.name: spec[f.name] for f in fields(LayerSpec)})
        if spec.input_dependent:
            raise ConfigError(
                f"{what}: {name} routes by a learned router (method={spec.method}, routing={spec.routing}): each "
                "token mixes the B heads with its own gates, so no single LoRA or merged weight reproduces it, and "
                "no serving engine (vLLM, SGLang, PEFT) applies a per-token mixture of LoRAs; only lora and "
                "task-routed adapters export")


def check_task_dirs(tasks: list[str], with_base: bool) -> None:
    """ConfigError unless every task name can be a directory name of its own beside ``base/``."""
    if not tasks:
        raise ConfigError("--all-tasks: this adapter has no tasks (a single LoRA); export it without --all-tasks")
    for task in tasks:
        if not _TASK_DIR.fullmatch(task):
            raise ConfigError(f"--all-tasks: task {task!r} cannot be a directory name (letters, digits, '_', '.', "
                              "'-', not starting with '.')")
        if with_base and task == BASE_DIR:
            raise ConfigError(f"--all-tasks: a task named {BASE_DIR!r} would collide with the base model dir "
                              f"{BASE_DIR}/ that holds the trained modules_to_save")


def write_task_adapters(model: Any, out: Path, with_saved_modules: bool, base_model_name: str | None) -> list[str]:
    """``out/<task>/`` for every task of ``model``: a PEFT LoRA adapter (modules_to_save included only with
    ``with_saved_modules``). Returns the task names."""
    from asymlora.merge import write_peft_adapter

    saved = {name: model.base_model.get_submodule(name) for name in model.saved_modules} if with_saved_modules else {}
    for task in model.tasks:
        write_peft_adapter(out / task, model.adapter_layers, saved, model.asymlora_config.task_id(task),
                           base_model_name)
    return list(model.tasks)


def serving_readme(tasks: list[str], base: str, has_base_dir: bool, adapter: str, targets: list[str],
                   rank: int) -> str:
    """The README of an ``export --all-tasks`` directory: what is in it and how vLLM and PEFT serve it."""
    base_path = f"DIR/{BASE_DIR}" if has_base_dir else base
    lora_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)  # vLLM takes these sizes of LoRA slot
    modules = " ".join(f"{t}=DIR/{t}" for t in tasks)
    first, rest = tasks[0], tasks[1:]
    lines = [
        "# Every task of an asymlora adapter as PEFT LoRA adapters",
        "",
        f"Written by `asymlora export --all-tasks` from the adapter `{adapter}` on the base model `{base}`. "
        "`DIR` below stands for the directory holding this file.",
        "",
        f"- `DIR/<task>/` (one per task: {', '.join(f'`{t}`' for t in tasks)}): a standard PEFT LoRA adapter "
        f"(`adapter_config.json` + `adapter_model.safetensors`, rank {rank}): the adapter's shared A and that "
        "task's B head. The asymlora model routed to that task computes the same as the base model with this LoRA.",
    ]
    if has_base_dir:
        lines += [
            f"- `DIR/{BASE_DIR}/`: the base model with the modules the adapter trained whole (modules_to_save, e.g. "
            "the projector) folded in. vLLM loads only the LoRA weights of an adapter, never its modules_to_save, "
            "so the task adapters leave them out and this model carries them: serve `DIR/base` (not the original "
            "base) with the task LoRAs, in vLLM and in PEFT, to reproduce asymlora.",
        ]
    lines += [
        f"- Adapted modules: {', '.join(f'`{t}`' for t in targets[:8])}{' ...' if len(targets) > 8 else ''} "
        f"({len(targets)} in all). Which modules vLLM applies a LoRA to depends on its implementation of the "
        "model (for multimodal models, typically the language model's layers): check that these are among "
        "them; PEFT applies every one.",
        "",
        "## vLLM",
        "",
        "OpenAI-compatible server, one LoRA per task; a request picks its task with `model`:",
        "",
        "```bash",
        f"vllm serve {base_path} --enable-lora --max-lora-rank {lora_rank} --max-loras {len(tasks)} \\",
        f"    --lora-modules {modules}",
        "```",
        "",
        "```bash",
        "curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"    -d '{{\"model\": \"{first}\", \"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}]}}'",
        "```",
        "",
        "Offline: one `LoRARequest(name, unique int id, path)` per prompt, so that one batch mixes tasks:",
        "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "from vllm.lora.request import LoRARequest",
        "",
        f"llm = LLM(model=\"{base_path}\", enable_lora=True, max_lora_rank={lora_rank}, max_loras={len(tasks)})",
        "tasks = {" + ", ".join(f'"{t}": LoRARequest("{t}", {i + 1}, "DIR/{t}")' for i, t in enumerate(tasks)) + "}",
        "# prompts[i] is for the task names[i]: each prompt carries its own task's LoRA",
        "outputs = llm.generate(prompts, SamplingParams(temperature=0), lora_request=[tasks[t] for t in names])",
        "```",
        "",
        "## PEFT",
        "",
        "Every task in one `PeftModel`; `adapter_names` routes each sample of a batch to its task's LoRA:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText",
        "",
        f"base = AutoModelForImageTextToText.from_pretrained(\"{base_path}\")",
        f"model = PeftModel.from_pretrained(base, \"DIR/{first}\", adapter_name=\"{first}\")",
    ]
    lines += [f"model.load_adapter(\"DIR/{t}\", adapter_name=\"{t}\")" for t in rest]
    lines += [
        "model.eval()",
        "# batch: the processor's output for N samples; one task name per sample",
        f"logits = model(**batch, adapter_names=[{', '.join(repr(t) for t in (tasks * 2)[:2])}]).logits",
        "generated = model.generate(**batch, adapter_names=[...], max_new_tokens=32)",
        "```",
        "",
        "`\"__base__\"` in `adapter_names` runs a sample through the base model alone.",
        "",
    ]
    return "\n".join(lines)
