"""Quality benchmark: LoRA vs LoRA-MoE vs AsymLoRA (task-routed, dense and top-2 MoE, hybrid) on a task mixture.

Each method is trained with ``asymlora train`` (the preset ``default_<method>``, i.e. the default model
after alignment on ``mix5``) at a matched trainable-parameter budget, for several seeds, and every task
is evaluated on its test split with ``asymlora eval``'s built-in metrics. Optionally each method is also
trained on one task at a time (the single-domain setting), so the cost of mixing conflicting tasks is
visible, and once at matched rank.

    python benchmarks/quality.py                                    # every method, 3 seeds, mix5
    python benchmarks/quality.py --steps 40 --seeds 0 --eval-samples 40   # a short CPU run
    python benchmarks/quality.py --single-domain --matched-rank      # the two extra settings
    python benchmarks/quality.py --single-domain data                # one-task adapters on equal data
    python benchmarks/quality.py --methods lora --single-domain data --no-mixed --seeds 1   # only those, seed 1
    python benchmarks/quality.py --set loraplus_lr_ratio=4 --name mix5_loraplus4   # a variant, in its own file
    python benchmarks/quality.py --model tiny --mixture tiny --steps 4 --eval-samples 4  # smoke test

Budgets: LoRA at ``--rank`` (r=16) sets the budget of trainable adapter parameters (projector excluded);
every other method gets the integer rank whose adapter parameter count is closest to it (counted on the
real model structure, built on the meta device). ``alpha = 2 r`` everywhere. Trained on one task,
task-routed AsymLoRA and hybrid have one head, i.e. they are LoRA: their single-domain reference is LoRA's
run, which is not repeated.

Single-domain runs come in two designs (``--single-domain steps data`` runs both):
- ``steps`` (the default): each one-task adapter trains ``--steps`` steps, as long as the mixture adapter.
  It then sees 1/share times as many samples of its task, so its lead mixes the conflict with more data.
- ``data``: each one-task adapter trains ``round(steps * share)`` steps (share = the task's sampling
  weight in the mixture), i.e. on as many samples of its task as the mixture adapter sees on average;
  what is left of the gap is the cost (or gain) of sharing the adapter.

Every finished run is appended to ``<out>/quality_<name>.json`` at once, and a rerun skips the runs that
are already there, so a long benchmark can be stopped and continued. Within a run, nothing trained is lost
either: a run stopped during its evaluation keeps its finished training (the rerun evaluates it), and one
stopped during training continues from its last checkpoint (one every 100 steps). The report (``RESULTS.md``-ready
markdown and a plot) is rewritten from that file after each run. The bulky outputs stay under ``--runs-dir``
(``runs/quality``, ignored by git): each run's adapter and its test predictions with their per-item scores in
``<run>/eval/`` (what ``asymlora eval --out`` writes), and for every seed with a LoRA run
``<runs-dir>/<name>/paired/s<seed>/``, each method's paired difference to it on the same items
(``asymlora compare --reference``). Those comparisons pooled over seeds (``benchmarks/paired_seeds.py``) go
into the summary as ``paired``, so ``<out>`` holds one JSON, one Markdown file and one plot per benchmark.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

import asymlora.train
import asymlora.train.config
from asymlora.config import rank_for_budget
from asymlora.evaluate.scores import oriented
from asymlora.io import read_yaml, write_json_and_markdown

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "lora_moe": {"method": "lora_moe", "num_experts": 4, "routing": "dense", "balance_loss_weight": 0.01},
    "asymlora": {"method": "asymlora", "routing": "task"},
    "asymlora_moe": {"method": "asymlora_moe", "num_experts": 4, "routing": "dense", "balance_loss_weight": 0.01},
    # Top-2 of 4: each head trains on the tokens routed to it, so the heads do not stay identical the way
    # zero-initialised heads under dense gates do (docs/RESULTS.md, "Routers and gradient conflict").
    "asymlora_moe_top2": {"method": "asymlora_moe", "num_experts": 4, "routing": "topk", "top_k": 2,
                          "balance_loss_weight": 0.01},
    "hybrid": {"method": "asymlora_moe", "routing": "hybrid", "balance_loss_weight": 0.01},  # E = tasks
}
PRESET = "default_asymlora_moe"  # model, data and training sections shared by every method
CHECKPOINT_STEPS = 100  # a run stopped during training continues from its last checkpoint
# how often a run saves: not part of what it computes, so a run saved at another cadence is the same run
def adapter_values(method: str, r: int, tasks: list[str]) -> dict[str, Any]:
    values = copy.deepcopy(METHODS[method])
    if values.get("routing") in ("task", "hybrid"):
        values["num_experts"] = len(tasks)
    if values["method"] != "lora" and values.get("num_experts", 1) == 1:
        values = {"method": "lora"}  # one task: task routing has one head, i.e. LoRA
    values.update({"r": r, "alpha": 2 * r, "target_modules": "all-linear", "modules_to_save": ["projector"],
                   "tasks": tasks})
    return values


SINGLE_SETTINGS = {"steps": "single", "data": "single_data"}  # --single-domain design -> run setting
SINGLE_TITLES = {"single": "equal steps", "single_data": "equal data"}


def single_task_form(method: str) -> str:
    """The method whose one-task adapter ``method``'s is: LoRA for the methods with one head per task."""
    return "lora" if adapter_values(method, 1, ["task"])["method"] == "lora" else method


def task_shares(mixture: str) -> dict[str, float]:
    """Each task's share of the mixture's training draws (its datasets' weights over the total)."""
    from asymlora.data import load_mixture

    weights: dict[str, float] = {}
    for entry in load_mixture(mixture).entries:
        weights[entry.task] = weights.get(entry.task, 0.0) + entry.weight
    total = sum(weights.values())
    return {task: w / total for task, w in weights.items()}


def count_adapter_params(model_dir: Path, values: dict[str, Any]) -> int:
    """Trainable adapter parameters (A, B banks, routers, task biases; projector excluded) of ``values``
    on the model in ``model_dir``, counted on a meta-device copy (no weights are loaded)."""
    import transformers

    import asymlora
    from asymlora import AsymLoraConfig

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    wrapped = asymlora.get_model(model, AsymLoraConfig.from_dict({**values, "modules_to_save": []}))
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def matched_rank(model_dir: Path, method: str, tasks: list[str], budget: int, max_rank: int = 64) -> tuple[int, int]:
    """(rank, params) of ``method`` closest to ``budget`` trainable adapter parameters."""
    return rank_for_budget(lambda r: count_adapter_params(model_dir, adapter_values(method, r, tasks)), budget,
                           max_rank)


def run_config(args: argparse.Namespace, method: str, r: int, seed: int, tasks: list[str], mixture: Any,
               output_dir: Path, steps: int) -> dict[str, Any]:
    values = read_yaml(asymlora.train.config.PRESETS_DIR / f"{PRESET}.yaml",
                       "the training preset")
    values["model"] = {**values.get("model", {}), "path": args.model}
    if args.projector is not None:
        values["model"]["projector"] = args.projector or None
    values["data"] = {**values.get("data", {}), "mixture": mixture, "eval_split": None}
    values["adapter"] = adapter_values(method, r, tasks)
    values["projector_lr"] = args.projector_lr
    values["training"] = {**values.get("training", {}), "output_dir": str(output_dir), "max_steps": steps,
                          "per_device_train_batch_size": args.batch_size, "learning_rate": args.lr,
                          "seed": seed, "save_steps": max(min(steps, CHECKPOINT_STEPS), 1), "save_total_limit": 1,
                          "logging_steps": max(1, min(10, steps // 4)), "report_to": []}
    return asymlora.train.apply_overrides(values, args.set, "quality.py --set")


def machine() -> dict[str, str]:
    """What a run's float order depends on besides its config: the device and, on a CPU, its model and the
    instruction set torch dispatches to (a run repeats bit for bit only on the same kind; docs/training.md)."""
    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {"device": "cpu", "cpu": model or platform.processor() or "unknown",
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


class Prior(NamedTuple):
    """What a run dir already holds of a run (:func:`prior_training`)."""

    kind: str  # "done", "resume" or "new"
    train_seconds: float | None = None  # "done": the Trainer's train_runtime
    checkpoint: Path | None = None  # "resume": the last complete checkpoint


def prior_training(run_dir: Path, config: dict[str, Any]) -> Prior:
    """What ``run_dir`` already holds of the run ``config`` describes: ``"done"`` (with its train seconds) when
    that training finished there (the benchmark stopped before the run's result was written, e.g. during its
    evaluation), ``"resume"`` (with the checkpoint) when it stopped after a checkpoint
    (:func:`asymlora.train.last_checkpoint`), else ``"new"``. A dir that another config trained in is
    ``"new"``: it is trained again, from scratch, the old run moved to ``<dir>.replaced-N``
    (``replace_run``)."""
    from asymlora.errors import ConfigError
    from asymlora.train import last_checkpoint
    from asymlora.train.checkpoints import config_differences

    try:
        written = read_yaml(run_dir / "train_config.yaml", "a run's training config")
    except ConfigError:  # no run there (or an unreadable one): train it
        return Prior("new")
    if config_differences(written, config):  # cadence, logging, resume and replace_run aside
        return Prior("new")
    state_path = run_dir / "trainer_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    steps = config["training"]["max_steps"]
    if state.get("global_step") == steps and (run_dir / "adapter_model.safetensors").is_file():
        runtime = [e["train_runtime"] for e in state.get("log_history", []) if "train_runtime" in e]
        return Prior("done", train_seconds=runtime[-1] if runtime else None)
    checkpoint = last_checkpoint(run_dir)
    return Prior("new") if checkpoint is None else Prior("resume", checkpoint=checkpoint)


def train_and_eval(args: argparse.Namespace, method: str, r: int, seed: int, tasks: list[str],
                   mixture: Any, eval_mixture: str, output_dir: Path, steps: int) -> dict[str, Any]:
    from asymlora.evaluate.report import write_report
    from asymlora.evaluate.run import evaluate_builtin, load_for_eval
    from asymlora.evaluate.scores import mean_score
    from asymlora.model import param_report
    from asymlora.train import TrainConfig, run_training

    config = TrainConfig.from_dict(run_config(args, method, r, seed, tasks, mixture, output_dir, steps),
                                   source=f"quality:{method}")
    prior = prior_training(output_dir, config.to_dict())
    config.replace_run = prior.kind == "new"  # another config's run there: moved aside, not mixed in
    train_seconds = prior.train_seconds
    resumed = None if prior.checkpoint is None else int(prior.checkpoint.name.split("-")[1])
    if prior.kind == "done":  # trained before the benchmark stopped: evaluate it, do not train it again
        print(f"   {output_dir}: trained before ({steps} steps); evaluating it", flush=True)
        run_dir = output_dir
    else:
        if prior.checkpoint is not None:
            print(f"   {output_dir}: continuing from step {resumed}", flush=True)
        start = time.time()
        run_dir = run_training(config, resume=str(prior.checkpoint) if prior.checkpoint is not None else False)
        train_seconds = time.time() - start
    state = json.loads((run_dir / "trainer_state.json").read_text()) if (run_dir / "trainer_state.json").is_file() \
        else {}
    losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e]
    manifest = json.loads((run_dir / "adapter_config.json").read_text())
    model, processor, adapter_tasks = load_for_eval(adapter=str(run_dir))
    roles = param_report(model)["by_role"]
    trainable = sum(n for role, n in roles.items() if role != "modules_to_save")  # A, B banks, routers, biases
    start = time.time()
    results, predictions = evaluate_builtin(model, processor, tasks, adapter_tasks, split="test",
                                            max_samples=args.eval_samples, batch_size=args.eval_batch_size,
                                            max_new_tokens=args.max_new_tokens, mixture=eval_mixture,
                                            prompt_suffix=args.prompt_suffix)
    del model
    eval_seconds = time.time() - start
    # the per-item scores, as `asymlora eval --out` writes them: `asymlora compare` pairs runs on them
    eval_dir = run_dir / "eval"
    mean = mean_score(results)
    write_report(eval_dir, {"name": output_dir.name, "tasks": results, "mean": mean,
                            "setup": {"adapter": str(run_dir), "split": "test", "max_samples": args.eval_samples,
                                      "prompt_suffix": args.prompt_suffix,
                                      "decoding": f"greedy, max_new_tokens={args.max_new_tokens}"},
                            "seconds": round(eval_seconds, 1)}, predictions)
    return {"method": method, "r": r, "seed": seed, "tasks": tasks, "steps": steps, "adapter_params": trainable,
            "scores": {t: {"metric": v["metric"], "value": v[v["metric"]], "higher_is_better": v["higher_is_better"],
                           "count": v["count"]} for t, v in results.items()},
            "mean": mean, "train_seconds": None if train_seconds is None else round(train_seconds, 1),
            # a resumed run's time is that of its last part only; a reused one's, the Trainer's own train_runtime
            **({"resumed_from_step": resumed} if resumed is not None else {}),
            **({"training_reused": True} if prior.kind == "done" else {}),
            "eval_seconds": round(eval_seconds, 1),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "adapter": manifest.get("method", method), "eval_dir": str(eval_dir)}


def write_paired(data: dict[str, Any], runs_root: Path, resamples: int = 10_000) -> list[Path]:
    """Per seed of the mixture runs (matched budget and matched rank), every run's paired difference to LoRA's
    run of that seed on the same test items (``asymlora compare --reference``): ``<runs_root>/paired/s<seed>/``.
    Seeds without a LoRA run, and runs whose eval dir is gone (or predates the per-item scores), are skipped."""
    from asymlora.evaluate.report import compare

    written = []
    for seed in sorted({r["seed"] for r in data["runs"] if r["setting"] == "mixed"}):
        runs = [r for r in data["runs"] if r["setting"] in ("mixed", "matched_rank") and r["seed"] == seed
                and (Path(r.get("eval_dir", "")) / "predictions.jsonl").is_file()]
        reference = next((r for r in runs if r["method"] == "lora"), None)
        if reference is None or len(runs) < 2:
            continue
        dirs = [reference["eval_dir"]] + [r["eval_dir"] for r in runs if r is not reference]
        paths = compare(dirs, runs_root / "paired" / f"s{seed}", reference=reference["eval_dir"], resamples=resamples)
        written.append(paths["paired_json"])
    return written


def sibling(name: str) -> Any:
    """Another script of this folder (``benchmarks/`` is not a package), as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pool_paired(data: dict[str, Any], paired_files: list[Path]) -> None:
    """Put the per-seed comparisons, pooled over seeds, into ``data["paired"]`` under their reference's name
    (other entries, e.g. comparisons made by hand on the same adapters, are kept)."""
    if not paired_files:
        return
    paired_seeds = sibling("paired_seeds")
    pooled = paired_seeds.pool([paired_seeds.load(path) for path in paired_files])
    data.setdefault("paired", {})[pooled["reference"]] = pooled


def _fmt(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _train_seconds(runs: list[dict[str, Any]]) -> float | None:
    """The mean train time of the runs whose whole training was timed (not those continued from a checkpoint)."""
    whole = [r["train_seconds"] for r in runs if r.get("train_seconds") is not None and "resumed_from_step" not in r]
    return statistics.mean(whole) if whole else None


def summarize(runs: list[dict[str, Any]], setting: str, tasks: list[str]) -> list[dict[str, Any]]:
    """One row per method of ``setting``: per-task and mean scores over seeds."""
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["setting"] == setting and r["method"] == method]
        if not mine:
            continue
        row: dict[str, Any] = {"method": method, "seeds": sorted({r["seed"] for r in mine}),
                               "r": sorted({r["r"] for r in mine}), "adapter_params": mine[0]["adapter_params"],
                               "train_seconds": _train_seconds(mine)}
        if setting in SINGLE_TITLES:  # one run per task and seed: that task's score
            for task in tasks:
                row[task] = [r["scores"][task]["value"] for r in mine if r["tasks"] == [task]]
        else:
            for task in tasks:
                row[task] = [r["scores"][task]["value"] for r in mine if task in r["scores"]]
            row["mean"] = [r["mean"] for r in mine]
        rows.append(row)
    return rows


def to_markdown(data: dict[str, Any]) -> str:
    runs, tasks, setup = data["runs"], data["tasks"], data["setup"]
    metrics = {}
    for run in runs:
        for task, score in run["scores"].items():
            metrics[task] = score["metric"] + ("" if score["higher_is_better"] else " ↓")
    lines = [f"Setup: {json.dumps(setup)}", ""]
    titles = [("mixed", "Trained on the mixture (mean ± std over seeds)"),
              ("matched_rank", "Mixture, matched rank instead of matched budget")]
    titles += [(setting, f"Single-domain, {how}: one adapter per task (each cell its own run)")
               for setting, how in SINGLE_TITLES.items()]
    for setting, title in titles:
        rows = summarize(runs, setting, tasks)
        if not rows:
            continue
        single = setting in SINGLE_TITLES
        lines += [f"### {title}", ""]
        if single:
            steps = {t: sorted({r.get("steps", setup["steps"]) for r in runs if r["setting"] == setting
                                and r["tasks"] == [t]}) for t in tasks}
            lines += ["Steps per task: " + ", ".join(f"{t} {'/'.join(map(str, s))}" for t, s in steps.items() if s)
                      + ". Task-routed AsymLoRA and hybrid trained on one task are LoRA (one head).", ""]
        lines += ["| method | r | adapter params | seeds | " + " | ".join(f"{t} ({metrics.get(t, '')})" for t in tasks)
                  + (" |" if single else " | mean |") + " train s/run |",
                  "|---" * (len(tasks) + (5 if single else 6)) + "|"]
        for row in rows:
            cells = [_fmt(row[t]) for t in tasks] + ([] if single else [_fmt(row["mean"])])
            lines.append(f"| {row['method']} | {'/'.join(map(str, row['r']))} | {row['adapter_params']:,} | "
                         f"{len(row['seeds'])} | " + " | ".join(cells) + " | "
                         + ("" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}") + " |")
        lines.append("")
    mixed = {row["method"]: row for row in summarize(runs, "mixed", tasks)}
    for setting, how in SINGLE_TITLES.items():
        single_rows = {row["method"]: row for row in summarize(runs, setting, tasks)}
        if not (mixed and single_rows):
            continue
        lines += [f"### Conflict cost, {how}: mixed − single-domain (per task; negative = mixing hurts)", "",
                  "| method | single-domain reference | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
        for method in mixed:
            reference = single_rows.get(single_task_form(method))
            if reference is None:
                continue
            cells = []
            for task in tasks:
                m, s = mixed[method][task], reference[task]
                sign = 1 if all(run["scores"].get(task, {}).get("higher_is_better", True) for run in runs
                                if task in run["scores"]) else -1
                cells.append(f"{sign * (statistics.mean(m) - statistics.mean(s)):+.3f}" if m and s else "")
            lines.append(f"| {method} | {reference['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + extras_markdown(data))


def extras_markdown(data: dict[str, Any]) -> list[str]:
    """The sections beside the runs: ``evals`` (``asymlora eval`` outputs of adapters scored outside this script,
    e.g. on other items), ``paired`` (comparisons pooled over seeds, by reference) and ``caption_parts``
    (``benchmarks/caption_parts.py`` tables), each entry with an optional ``description``."""
    lines: list[str] = []
    evals = data.get("evals")
    if evals:
        tasks = list(next(iter(evals["runs"].values()))["tasks"])
        lines += ["### Evaluations beside the runs above (`asymlora eval`)", ""]
        lines += [evals["description"], ""] if evals.get("description") else []
        lines += ["| run | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
        for run, result in evals["runs"].items():
            cells = []
            for task in tasks:
                score = result["tasks"].get(task)
                cells.append("" if score is None else f"{score[score['metric']]:.3f}"
                             + ("" if score["higher_is_better"] else " ↓"))
            lines.append(f"| {run} | " + " | ".join(cells) + f" | {result['mean']:.3f} |")
        lines.append("")
    for label, pooled in (data.get("paired") or {}).items():
        lines += [f"### Paired differences to {label}, over seeds", ""]
        lines += [pooled["description"], ""] if pooled.get("description") else []
        lines += [sibling("paired_seeds").markdown(pooled)]
    for label, entry in (data.get("caption_parts") or {}).items():
        lines += [f"### Emoji captions: {label}", ""]
        lines += [entry["description"], ""] if entry.get("description") else []
        lines += [sibling("caption_parts").markdown(entry["runs"])]
    return lines


def plot(data: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["tasks"]
    rows = summarize(data["runs"], "mixed", tasks)
    labels = [*tasks, "mean"]
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.6))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        higher = {t: next((r["scores"][t]["higher_is_better"] for r in data["runs"] if t in r["scores"]), True)
                  for t in tasks}
        values = [[oriented(v, higher[t]) for v in row[t]] for t in tasks] + [row["mean"]]
        means = [statistics.mean(v) if v else 0 for v in values]
        errs = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
        ax.bar([k + i * width for k in range(len(labels))], means, width, yerr=errs, label=row["method"], capsize=2)
    ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in range(len(labels))], labels)
    ax.set_ylabel("score (CER as 1 − CER)")
    ax.set_title("quality: adapters trained on the mixture")
    ax.legend(fontsize=7, ncol=min(len(rows), 5))
    fig.tight_layout()
    with_tmp = path.with_suffix(".tmp.png")
    fig.savefig(with_tmp, dpi=120)
    plt.close(fig)
    with_tmp.replace(path)
    return path


def write_outputs(data: dict[str, Any], out: Path, name: str, runs_root: Path) -> None:
    """The summary: ``<out>/quality_<name>.{json,md,png}``; the per-seed comparisons under ``runs_root``."""
    mixed = bool(summarize(data["runs"], "mixed", data["tasks"]))
    if mixed:
        pool_paired(data, write_paired(data, runs_root))
    write_json_and_markdown(out, f"quality_{name}", data, to_markdown(data))
    if mixed:
        plot(data, out / f"quality_{name}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default', 'tiny' or a local LLaVA-style model dir")
    parser.add_argument("--projector", default=None, help="projector to start from (default: the preset's, "
                        "'aligned'); '' for none")
    parser.add_argument("--mixture", default="mix5", help="built-in mixture name or mixture YAML")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank that sets the parameter budget")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--projector-lr", type=float, default=1e-4)
    parser.add_argument("--eval-samples", type=int, default=None, help="test items per task (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8,
                        help="greedy decoding length (default %(default)s: the built-in answers are a word or two)")
    parser.add_argument("--prompt-suffix", default=None, help="appended to every test question")
    parser.add_argument("--single-domain", nargs="*", choices=list(SINGLE_SETTINGS), default=None,
                        help="also train each method on each task alone: for --steps steps ('steps', the "
                        "default), and/or on the task's share of them ('data'); see the designs above")
    parser.add_argument("--matched-rank", action="store_true", help="also one seed of every method at r = --rank")
    parser.add_argument("--no-mixed", action="store_true",
                        help="skip the mixture runs (only --single-domain / --matched-rank), e.g. to add one-task "
                        "runs of another seed to mixture runs made elsewhere")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="asymlora train overrides for every run, after the method's (e.g. "
                        "loraplus_lr_ratio=4); use a --name of their own")
    parser.add_argument("--name", default=None, help="results name (default: <mixture>_<steps>steps)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="where the summary goes: quality_<name>.{json,md,png}")
    parser.add_argument("--runs-dir", default="runs/quality",
                        help="where the training runs, their evals and the per-seed comparisons go (bulky; "
                        "runs/ is ignored by git)")
    args = parser.parse_args(argv)

    from asymlora.data import load_mixture
    from asymlora.loading import resolve_model_dir

    mixture = load_mixture(args.mixture)
    tasks = list(mixture.tasks)
    model_dir = resolve_model_dir(args.model)
    name = args.name or f"{Path(args.mixture).stem}_{args.steps}steps"
    out = Path(args.out)
    path = out / f"quality_{name}.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    before = {"overrides": [], **data.get("setup", {})}
    now = {"model": args.model, "mixture": args.mixture, "steps": args.steps, "batch_size": args.batch_size,
           "lr": args.lr, "projector_lr": args.projector_lr, "eval_samples": args.eval_samples, "overrides": args.set,
           "max_new_tokens": args.max_new_tokens, "prompt_suffix": args.prompt_suffix}
    changed = [k for k in now if k in before and before[k] != now[k]] if data["runs"] else []
    if changed:  # the runs of one file must be comparable
        raise SystemExit(f"{path}: its runs were made with " + ", ".join(f"{k}={before[k]!r}" for k in changed)
                         + "; these settings give " + ", ".join(f"{k}={now[k]!r}" for k in changed)
                         + ": use another --name")
    here = machine()  # recorded in the setup and with each run: a run repeats bit for bit only on the same kind
    budget = count_adapter_params(model_dir, adapter_values("lora", args.rank, tasks))
    ranks = {m: matched_rank(model_dir, m, tasks, budget) for m in args.methods}
    data.update({"tasks": tasks, "budget": budget, "ranks": {m: {"r": r, "params": p} for m, (r, p) in ranks.items()},
                 "setup": {"model": args.model, "mixture": args.mixture, "steps": args.steps,
                           "batch_size": args.batch_size, "lr": args.lr, "projector_lr": args.projector_lr,
                           "eval_samples": args.eval_samples, "max_new_tokens": args.max_new_tokens,
                           "prompt_suffix": args.prompt_suffix, "budget_rank": args.rank, "overrides": args.set,
                           "device": here["device"], "torch": torch.__version__, "threads": torch.get_num_threads()}})
    for method, (r, params) in ranks.items():
        print(f"{method}: r={r} -> {params:,} adapter params (budget {budget:,})")

    plan: list[tuple[str, str, int, int, list[str]]] = []
    for seed in [] if args.no_mixed else args.seeds:
        plan += [("mixed", m, ranks[m][0], seed, tasks) for m in args.methods]
    if args.matched_rank:
        plan += [("matched_rank", m, args.rank, args.seeds[0], tasks) for m in args.methods if ranks[m][0] != args.rank]
    single_steps: dict[tuple[str, str], int] = {}  # (setting, task) -> steps of that one-task run
    if args.single_domain is not None:
        designs = args.single_domain or ["steps"]
        shares = task_shares(args.mixture)
        single_methods = list(dict.fromkeys(single_task_form(m) for m in args.methods))  # asymlora -> lora
        single_ranks = {m: matched_rank(model_dir, m, [tasks[0]], budget)[0] for m in single_methods}
        for design in designs:
            setting = SINGLE_SETTINGS[design]
            for t in tasks:
                single_steps[(setting, t)] = args.steps if design == "steps" else max(1, round(args.steps * shares[t]))
            plan += [(setting, m, single_ranks[m], args.seeds[0], [t]) for m in single_methods for t in tasks]
    done = {(r["setting"], r["method"], r["r"], r["seed"], tuple(r["tasks"])) for r in data["runs"]}
    for setting, method, r, seed, run_tasks in plan:
        if (setting, method, r, seed, tuple(run_tasks)) in done:
            continue
        run_steps = single_steps.get((setting, run_tasks[0]), args.steps)
        if len(run_tasks) == 1:  # that task's entry of the mixture, alone
            entries = [copy.deepcopy(raw) for raw, entry in zip(_mixture_entries(args.mixture), mixture.entries)
                       if entry.task == run_tasks[0]]
            run_mixture: Any = {"name": f"single-{run_tasks[0]}", "datasets": entries}
        else:
            run_mixture = args.mixture
        label = f"{setting}-{method}-r{r}-s{seed}" + (f"-{run_tasks[0]}" if setting in SINGLE_TITLES else "")
        print(f"== {label} ({run_steps} steps)", flush=True)
        result = train_and_eval(args, method, r, seed, run_tasks, run_mixture, args.mixture,
                                Path(args.runs_dir) / name / label, run_steps)
        data["runs"].append({"setting": setting, **result, "machine": here})
        write_outputs(data, out, name, Path(args.runs_dir) / name)
        took = "" if result["train_seconds"] is None else f"train {result['train_seconds']:.0f}s  "
        print(f"   mean {result['mean']:.3f}  {took}"
              + "  ".join(f"{t}={s['value']:.3f}" for t, s in result["scores"].items()), flush=True)
    write_outputs(data, out, name, Path(args.runs_dir) / name)
    print(to_markdown(data))
    return 0


def _mixture_entries(mixture: str) -> list[dict[str, Any]]:
    """The dataset entries of a mixture (a built-in name or a YAML path), as written in its YAML."""
    from asymlora.data.mixture import BUILTIN_DIR

    path = Path(mixture) if Path(mixture).suffix in (".yaml", ".yml") else BUILTIN_DIR / f"{mixture}.yaml"
    entries = list(read_yaml(path, "a mixture")["datasets"])  # load_mixture checked it
    for entry in entries:  # paths in a user mixture are relative to its file
        if "path" in entry and not Path(entry["path"]).is_absolute():
            entry["path"] = str((path.parent / entry["path"]).resolve())
    return entries


if __name__ == "__main__":
    raise SystemExit(main())
