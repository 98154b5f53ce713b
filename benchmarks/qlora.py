"""A quantized base (QLoRA) against a float32 base: same config, same steps, same evaluation.

Each arm trains the ``default_asymlora`` preset (the default model, mix5, task-routed asymlora, r=16,
all-linear, projector trained) for ``--steps`` steps at ``--batch-size``, in a process of its own, then
evaluates the adapter with ``asymlora eval`` on the first ``--eval-items`` test items of each task (greedy),
in another process. The arms differ only in ``model.quantization`` (float32: none; nf4: ``{bits: 4}``,
bitsandbytes NF4 with float32 compute). Recorded per arm: the bytes of the frozen base weights (quantized
weights with their scales, and every float tensor), the peak resident memory of the training and the eval
process (``ru_maxrss``), the per-step training time (median and mean of the steps after the first), the eval
time, the scores, and the output of ``uptime`` before each timed process (the host is shared: the load
average says how much of the CPU the arm had).

    python benchmarks/qlora.py --steps 20 --batch-size 4 --eval-items 50

Writes ``<out-dir>/qlora_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARMS: dict[str, str | None] = {"float32": None, "nf4": "{bits: 4, quant_type: nf4, compute_dtype: float32}"}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _run(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` with its output in ``log``; its wall time, peak RSS and the load before it started."""
    load = _uptime()
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed; see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "uptime_before": load}


def base_weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of the frozen base: quantized weights (with their bitsandbytes scales) and float tensors."""
    quantized = floats = 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        size = param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:  # 4-bit: absmax per block, and with double quantization its own scales
            for tensor in (state.absmax, getattr(getattr(state, "state2", None), "absmax", None), state.code):
                size += 0 if tensor is None else tensor.numel() * tensor.element_size()
        if getattr(param, "SCB", None) is not None:  # 8-bit: one scale per row
            size += param.SCB.numel() * param.SCB.element_size()
        if param.is_floating_point():
            floats += size
        else:
            quantized += size
    floats += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"quantized": quantized, "float": floats, "total": quantized + floats}


def child_train(arm: str, work: Path, steps: int, batch_size: int) -> None:
    """One arm's training, in this process; writes ``work/<arm>/bench.json``."""
    import transformers

    from asymlora.train import run_training
    from asymlora.train.config import TrainConfig

    out = work / arm
    overrides = [f"training.output_dir={out}", f"training.max_steps={steps}",
                 f"training.per_device_train_batch_size={batch_size}", "training.save_strategy=no",
                 "training.eval_strategy=no", "training.logging_steps=5", "training.report_to=[]"]
    if ARMS[arm]:
        overrides.append(f"model.quantization={ARMS[arm]}")
    config = TrainConfig.load("default_asymlora", overrides)
    record: dict[str, Any] = {"step_seconds": []}

    class Timer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            record["base_weight_bytes"] = base_weight_bytes(model.base_model)

        def on_step_begin(self, args, state, control, **kwargs):
            record["_t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_seconds"].append(time.perf_counter() - record.pop("_t"))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record.setdefault("loss", []).append(logs["loss"])

    run_training(config, callbacks=[Timer()])
    (out / "bench.json").write_text(json.dumps(record, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-items", type=int, default=50, help="test items per task")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="arms in the order run; a repeated arm runs again (e.g. nf4 float32 nf4 brackets the "
                        "float32 run: the host's load drifts over minutes)")
    parser.add_argument("--work", default="runs/qlora_bench", help="where the adapters and eval outputs go")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--child-train", choices=list(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if args.child_train:
        child_train(args.child_train, work, args.steps, args.batch_size)
        return
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from asymlora.io import write_json_atomic, write_text_atomic

    arms: dict[str, Any] = {}
    setup = {"preset": "default_asymlora", "steps": args.steps, "batch_size": args.batch_size,
             "eval_items_per_task": args.eval_items, "device": "cpu", "threads": torch.get_num_threads(),
             "machine": platform.machine(), "torch": torch.__version__, "bitsandbytes": _version("bitsandbytes")}
    out_dir = Path(args.out_dir)
    for i, arm in enumerate(args.arms):
        run = arm if arm not in arms else f"{arm}-run{i + 1}"
        train = _run([sys.executable, __file__, "--child-train", arm, "--work", str(work), "--steps", str(args.steps),
                      "--batch-size", str(args.batch_size)], work / f"{run}_train.log")
        (work / arm).rename(work / f"{run}.adapter")
        adapter = work / f"{run}.adapter"
        bench = json.loads((adapter / "bench.json").read_text())
        steps = bench["step_seconds"][1:] or bench["step_seconds"]
        evaluation = _run([sys.executable, "-m", "asymlora.cli", "eval", "--adapter", str(adapter),
                           "--max-samples", str(args.eval_items), "--out", str(adapter / "eval")],
                          work / f"{run}_eval.log")
        results = json.loads((adapter / "eval" / "results.json").read_text())
        arms[run] = {
            "quantization": ARMS[arm], "base_weight_bytes": bench["base_weight_bytes"],
            "train": {**train, "step_seconds_median": round(statistics.median(steps), 3),
                      "step_seconds_mean": round(statistics.mean(steps), 3), "steps_timed": len(steps),
                      "loss": bench.get("loss", [])},
            "eval": evaluation,
            "scores": {task: {"metric": r["metric"], "value": r[r["metric"]]} for task, r in results["tasks"].items()},
            "mean": results["mean"],
        }
        summary = {"setup": setup, "arms": arms}  # written after each arm
        write_json_atomic(out_dir / "qlora_cpu.json", summary)
        write_text_atomic(out_dir / "qlora_cpu.md", markdown(summary))
    print(markdown({"setup": setup, "arms": arms}))


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def markdown(summary: dict[str, Any]) -> str:
    s, arms = summary["setup"], summary["arms"]
    tasks = sorted({t for a in arms.values() for t in a["scores"]})
    lines = [f"## QLoRA on CPU: the default model, float32 base vs 4-bit base ({s['machine']}, {s['threads']} threads)",
             "",
             f"- preset `{s['preset']}`, {s['steps']} steps at batch {s['batch_size']}; eval: first "
             f"{s['eval_items_per_task']} test items per task, greedy; torch {s['torch']}, bitsandbytes "
             f"{s['bitsandbytes']}",
             "- timings taken on a shared host, under load (the `uptime` before each process is in the JSON)",
             "",
             "| base | base weights MiB | train peak RSS MiB | step s (median) | eval s | eval peak RSS MiB | "
             + " | ".join(tasks) + " | mean |",
             "|---|---|---|---|---|---|" + "---|" * (len(tasks) + 1)]
    for name, a in arms.items():
        scores = " | ".join(f"{a['scores'][t]['value']:.3f} ({a['scores'][t]['metric']})" if t in a["scores"] else "-"
                            for t in tasks)
        lines.append(f"| {name} | {a['base_weight_bytes']['total'] / 2**20:.1f} | {a['train']['peak_rss_mib']:.0f} | "
                     f"{a['train']['step_seconds_median']:.2f} | {a['eval']['seconds']:.0f} | "
                     f"{a['eval']['peak_rss_mib']:.0f} | {scores} | {a['mean']:.3f} |")
    lines += ["", "Load average before each process:", ""]
    for name, a in arms.items():
        lines.append(f"- {name}: train `{a['train']['uptime_before']}`; eval `{a['eval']['uptime_before']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
