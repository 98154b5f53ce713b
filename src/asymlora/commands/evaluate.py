"""`asymlora eval` and `asymlora compare`: generate answers, score them, write reports; runs side by side."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from asymlora.errors import ConfigError
from asymlora.evaluate import run as evaluation
from asymlora.io import check_output_dir
from asymlora.quantization import add_quantization_argument, quantization_argument


def _cli_eval(args: argparse.Namespace) -> int:
    from asymlora.evaluate.report import write_report
    from asymlora.evaluate.scores import mean_score

    start = time.time()
    out = check_output_dir(args.out, "--out")
    quantization = quantization_argument(args.quantization)
    model, processor, adapter_tasks = evaluation.load_for_eval(args.model, args.projector, args.adapter, args.merge_task,
                                                    args.dtype, quantization)
    setup = {"model": args.model, "projector": args.projector, "adapter": args.adapter,
             "quantization": args.quantization,
             "merge_task": args.merge_task, "split": args.split, "max_samples": args.max_samples,
             "prompt_suffix": args.prompt_suffix, "scoring": args.scoring, "candidates": args.candidates,
             "images": args.images,
             "decoding": f"greedy, max_new_tokens={args.max_new_tokens}"}
    name = args.name or (Path(args.adapter).name if args.adapter else "base")
    if args.bench:
        if not args.data:
            raise ConfigError("--bench needs --data (the benchmark's local files)")
        scores, predictions = evaluation.evaluate_benchmark(model, processor, args.bench, args.data, args.image_root,
                                                 args.max_samples, args.batch_size, args.max_new_tokens,
                                                 task=args.task, adapter_tasks=adapter_tasks)
        results = {"name": name, "benchmark": args.bench, "scores": scores, "setup": setup}
        out.mkdir(parents=True, exist_ok=True)
        from asymlora.io import write_json_atomic

        write_json_atomic(out / "results.json", results)
        print({k: v for k, v in scores.items() if not isinstance(v, (list, dict))})
        return 0
    from asymlora.data import load_mixture

    tasks = args.tasks or load_mixture(args.mixture).tasks
    task_results, predictions = evaluation.evaluate_builtin(
        model, processor, tasks, adapter_tasks, args.split, args.max_samples, args.batch_size,
        args.max_new_tokens, merged_task=args.merge_task, mixture=args.mixture, prompt_suffix=args.prompt_suffix,
        scoring=args.scoring, candidates=args.candidates, images=args.images)
    results = {"name": name, "tasks": task_results, "mean": mean_score(task_results), "setup": setup,
               "seconds": round(time.time() - start, 1)}
    paths = write_report(out, results, predictions)
    print((out / "report.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cli_compare(args: argparse.Namespace) -> int:
    from asymlora.evaluate.report import compare

    paths = compare(args.runs, Path(args.out), reference=args.reference, resamples=args.resamples, seed=args.seed,
                    max_items_per_task=args.max_items_per_task)
    print(paths["table"].read_text())
    if "paired" in paths:
        print(paths["paired"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="generate and score: built-in test splits or an official benchmark",
        description=evaluation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the base model: 'default', 'tiny' or a local Hugging Face "
                        "model dir (default: the adapter's training model, else 'default')")
    parser.add_argument("--projector", default=None, help="'aligned' or a projector safetensors to load first")
    parser.add_argument("--adapter", help="a trained asymlora adapter dir, or a checkpoint-N dir of a run; the "
                        "base model and projector not given come from the run's train_config.yaml (omit "
                        "--adapter to evaluate the base model)")
    parser.add_argument("--merge-task", help="merge the adapter for this task and evaluate the merged model")
    parser.add_argument("--tasks", nargs="+", help="built-in tasks to evaluate (default: every task of --mixture)")
    parser.add_argument("--mixture", default="mix5", help="mixture whose test split is evaluated")
    parser.add_argument("--split", default="test", help="split of the built-in datasets")
    parser.add_argument("--max-samples", type=int, help="evaluate at most this many samples per task")
    parser.add_argument("--bench", choices=["textvqa", "gqa", "vizwiz", "scienceqa", "mme", "pope"],
                        help="an official benchmark instead of the built-in tasks")
    parser.add_argument("--data", help="the benchmark's question file or folder")
    parser.add_argument("--image-root", help="the benchmark's image folder, if not next to --data")
    parser.add_argument("--task", help="with --bench: the adapter task to route by")
    parser.add_argument("--prompt-suffix", help="text appended to each built-in question, e.g. 'Answer the "
                        "question using a single word or phrase.' (LLaVA's short-answer instruction)")
    parser.add_argument("--scoring", choices=["generate", "rank", "rank-calibrated"], default="generate",
                        help="generate: greedy answers; rank: the most likely of the task's train answers "
                        "(closed set; for small answer sets); rank-calibrated: ranked by log p(answer | image) "
                        "- log p(answer | no image), i.e. by what the image adds")
    parser.add_argument("--candidates", choices=["task", "question"], default="task",
                        help="with --scoring rank*: which train answers compete: all of the task's, or those of "
                        "questions with the same template (answer words masked: 'what color is the _?'); results "
                        "then also hold the majority and per-question-template majority baselines")
    parser.add_argument("--images", choices=["own", "shuffled"], default="own",
                        help="shuffled: the blind control, each question asked about another test sample's image")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy decoding length")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype to load the model in")
    add_quantization_argument(parser, "the adapter's training config's model.quantization, else a float base")
    parser.add_argument("--name", help="run name in reports (default: the adapter dir name)")
    parser.add_argument("--out", required=True, help="output dir: results.json, report.md, scores.png")
    parser.set_defaults(func=_cli_eval)

    comp = subparsers.add_parser("compare", help="put several evaluated runs side by side (table + plot)")
    comp.add_argument("runs", nargs="+", help="output dirs of `asymlora eval`")
    comp.add_argument("--out", required=True, help="where compare.md and compare.png go")
    comp.add_argument("--reference", help="a compared run (name or dir): also paired.md/paired.json, each other "
                      "run's difference to it on the same test items with bootstrap intervals")
    comp.add_argument("--resamples", type=int, default=10_000, help="with --reference: bootstrap resamples")
    comp.add_argument("--seed", type=int, default=0, help="with --reference: the bootstrap's random seed")
    comp.add_argument("--max-items-per-task", type=int, metavar="N",
                      help="score every run on each task's first N items of its predictions.jsonl (the items "
                      "`asymlora eval --max-samples N` scores): compares an all-items eval with a shorter one")
    comp.set_defaults(func=_cli_compare)
