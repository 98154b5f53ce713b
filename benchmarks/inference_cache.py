"""Paired A/B of the stacked bank kept between inference forwards (``AsymLoraLinear._inference_stacked``).

An unmerged bank adapter (dense AsymLoRA-MoE cannot be merged; task routing cannot be merged for a batch of
mixed tasks) multiplies the gated codes by ``B_stacked`` (d_out, E*r), a copy of the bank (E, d_out, r).
Training re-stacks it in every forward; inference (eval mode, no gradient) keeps one copy per layer while the
bank is unchanged. This times both in one process, round by round in ABBA order (the host drifts by 10-30%
over minutes): ``kept`` is the library as it is, ``restacked`` the same model with the kept copy switched
off, which is the code path every forward took before the copy was kept. Per round and arm: one prefill
forward of the batch (logits of the last position) and ``--decode-tokens`` greedy decoding steps with a KV
cache (one new token per sample), as ``benchmarks/speed.py`` times them.

    python benchmarks/inference_cache.py --preset default --device cpu --methods asymlora asymlora_moe --experts 8

With ``--adapter DIR`` (a trained adapter whose routing cannot be merged: dense, top-k or hybrid) it times
``asymlora eval``'s own work instead, on the real model the adapter was trained on: ``evaluate_builtin`` on the
first ``--max-samples`` test items of every task, greedy, in both arms, and checks that both arms generate
the same answers.

Writes ``<out-dir>/inference_cache_<preset>_<device>.{json,md}`` (``inference_cache_eval.{json,md}`` with
``--adapter``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from asymlora import AsymLoraLinear
from asymlora.io import write_json_atomic, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the full-model benchmark: model, batch, decoding and timing helpers)


@contextlib.contextmanager
def restacking() -> Iterator[None]:
    """Every forward re-stacks the bank (the training path), as inference did before the copy was kept."""
    kept = AsymLoraLinear._inference_stacked
    AsymLoraLinear._inference_stacked = lambda self, like: None
    try:
        yield
    finally:
        AsymLoraLinear._inference_stacked = kept


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(speed.PRESETS), default="default")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--methods", nargs="+", choices=("asymlora", "asymlora_moe", "lora_moe"),
                        default=["asymlora", "asymlora_moe"])
    parser.add_argument("--experts", type=int, nargs="+", default=[8])
    parser.add_argument("--rounds", type=int, default=8, help="ABBA rounds (each times both arms twice)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each arm first")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decoding steps per timing (default: per preset)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--adapter", help="time asymlora eval of this trained adapter instead (see above)")
    parser.add_argument("--max-samples", type=int, default=8, help="--adapter: test items per task")
    parser.add_argument("--mixture", default="mix5", help="--adapter: the mixture whose test split is used")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="--adapter: greedy tokens per answer")
    return parser.parse_args(argv)


def _abba(rounds: int, fn: Callable[[], Any]) -> dict[str, list]:
    """Call ``fn()`` in both arms in ABBA order; per round and arm, the list of its two results."""
    out: dict[str, list] = {"kept": [], "restacked": []}
    for i in range(rounds):
        order = ("kept", "restacked", "restacked", "kept") if i % 2 == 0 else ("restacked", "kept", "kept", "restacked")
        got: dict[str, list] = {"kept": [], "restacked": []}
        for arm in order:
            with restacking() if arm == "restacked" else contextlib.nullcontext():
                got[arm].append(fn())
        for arm, values in got.items():
            out[arm].append(values)
    return out


def eval_main(args: argparse.Namespace) -> dict:
    """``--adapter``: ``asymlora eval``'s generation on the real model, kept vs restacked."""
    from asymlora.data import load_mixture
    from asymlora.evaluate.run import evaluate_builtin, load_for_eval

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    begin = time.perf_counter()
    model, processor, adapter_tasks = load_for_eval(adapter=args.adapter)
    layers = [m for m in model.modules() if isinstance(m, AsymLoraLinear)]
    if not layers or not any(layer.spec.input_dependent for layer in layers):
        raise SystemExit(f"--adapter {args.adapter}: no router-gated layer; a task-routed adapter is evaluated merged "
                         "or per task, use the model mode for it")
    tasks = load_mixture(args.mixture).tasks

    def evaluate() -> tuple[float, list[str]]:
        start = time.perf_counter()
        _, predictions = evaluate_builtin(model, processor, tasks, adapter_tasks, max_samples=args.max_samples,
                                          max_new_tokens=args.max_new_tokens, mixture=args.mixture)
        return time.perf_counter() - start, [p["prediction"] for p in predictions]

    for _ in range(args.warmup):
        evaluate()
    arms = _abba(args.rounds, evaluate)
    answers = {arm: [a for values in rounds for _, a in values] for arm, rounds in arms.items()}
    same = all(a == answers["kept"][0] for arm in answers for a in answers[arm])
    seconds = {arm: [statistics.mean(s for s, _ in values) for values in rounds] for arm, rounds in arms.items()}
    q1, med, q3 = _quartiles([k / r for k, r in zip(seconds["kept"], seconds["restacked"])])
    spec = layers[0].spec
    row = dict(adapter=args.adapter, method=spec.method, routing=spec.routing, E=spec.num_experts, r=spec.r,
               items=len(answers["kept"][0]), max_new_tokens=args.max_new_tokens, rounds=args.rounds,
               kept_s=statistics.median(seconds["kept"]), restacked_s=statistics.median(seconds["restacked"]),
               ratio=med, q1=q1, q3=q3, same_answers=same)
    env = dict(device_name=speed._device_name("cuda" if torch.cuda.is_available() else "cpu"),
               torch=torch.__version__, threads=torch.get_num_threads())
    result = dict(environment=env, eval=row, seconds=time.perf_counter() - begin)
    stem = Path(args.out_dir) / "inference_cache_eval"
    md = (f"## asymlora eval, kept vs re-stacked bank: {env['device_name']}\n\n"
          f"- adapter `{row['adapter']}`: {row['method']}, routing {row['routing']}, E={row['E']}, r={row['r']}; "
          f"{row['items']} test items (first {args.max_samples} per task), greedy, max {row['max_new_tokens']} new "
          f"tokens; {row['rounds']} ABBA rounds; torch {env['torch']}\n\n"
          "| eval s kept | eval s restacked | kept / restacked (IQR) | same answers |\n|---|---|---|---|\n"
          f"| {row['kept_s']:.1f} | {row['restacked_s']:.1f} | {row['ratio']:.3f} ({row['q1']:.3f}-{row['q3']:.3f}) | "
          f"{'yes' if same else 'NO'} |\n")
    write_json_atomic(stem.with_suffix(".json"), result)
    write_text_atomic(stem.with_suffix(".md"), md)
    log(md)
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.adapter:
        return eval_main(args)
    forwarded = ["--preset", args.preset, "--device", args.device, "--no-train", "--methods", *args.methods,
                 "--experts", *map(str, args.experts)]
    for flag in ("layers", "batch", "seq", "decode_tokens"):
        if getattr(args, flag) is not None:
            forwarded += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    s = speed.resolve_settings(speed.parse_args(forwarded))
    if not s.decode_tokens:
        raise SystemExit("--decode-tokens: must be at least 1")
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    begin = time.perf_counter()
    base = speed.build_base(s)
    rows = []
    for method in s.methods:
        for experts in s.experts:
            batch = speed.make_batch(s, experts)
            variant = speed.attach(base, method, experts, "fused", s)
            speed.randomize_b(variant, seed=s.seed)
            model = variant.wrapped.eval()
            kwargs = {"task_ids": batch["task_ids"]}  # mixed tasks: the batch cannot be merged

            @torch.inference_mode()
            def timed(model=model, kwargs=kwargs, batch=batch) -> tuple[float, float]:
                prompt = batch["input_ids"]
                prefill = speed.time_calls(lambda: speed._prefill(model, prompt, kwargs), s.device, 0, 1)[0]
                return prefill, speed._decode_seconds(model, prompt, s.decode_tokens, kwargs, s.device)

            try:
                for _ in range(args.warmup):
                    timed()
                    with restacking():
                        timed()
                pairs = _abba(args.rounds, timed)
            finally:
                variant.detach()
            arms = {arm: [tuple(statistics.mean(v[k] for v in values) for k in (0, 1)) for values in rounds]
                    for arm, rounds in pairs.items()}
            row: dict = dict(method=method, E=experts, rounds=args.rounds, decode_tokens=s.decode_tokens)
            for k, part in enumerate(("prefill", "decode")):
                kept = [a[k] for a in arms["kept"]]
                restacked = [a[k] for a in arms["restacked"]]
                ratios = [a / b for a, b in zip(kept, restacked)]
                q1, med, q3 = _quartiles(ratios)
                row.update({f"{part}_kept_ms": statistics.median(kept) * 1e3,
                            f"{part}_restacked_ms": statistics.median(restacked) * 1e3,
                            f"{part}_ratio": med, f"{part}_q1": q1, f"{part}_q3": q3})
            rows.append(row)
            log(f"{method} E={experts}: decode {row['decode_kept_ms']:.2f} ms kept vs {row['decode_restacked_ms']:.2f} "
                f"restacked (paired {row['decode_ratio']:.3f}); prefill {row['prefill_ratio']:.3f}")
    env = dict(device_name=speed._device_name(s.device), torch=torch.__version__, layers=s.layers, batch=s.batch,
               seq=s.seq, r=s.r, dtype=s.dtype, adapter_dtype=s.adapter_dtype, preset=s.preset,
               threads=torch.get_num_threads())
    result = dict(environment=env, rows=rows, seconds=time.perf_counter() - begin)
    stem = Path(args.out_dir) / f"inference_cache_{s.preset}_{'cuda' if s.device.startswith('cuda') else 'cpu'}"
    write_json_atomic(stem.with_suffix(".json"), result)
    write_text_atomic(stem.with_suffix(".md"), to_markdown(result))
    log(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"## Kept vs re-stacked bank in inference, preset {env['preset']}: {env['device_name']}", "",
             f"- {env['layers']} decoder layers, {env['dtype']}, adapters {env['adapter_dtype']}, r={env['r']}, "
             f"batch {env['batch']} (mixed tasks, unmerged), prompt {env['seq']} tokens; torch {env['torch']}",
             "- ms: medians over rounds; ratio: median of the per-round kept / restacked ratios (IQR), ABBA order",
             "", "| adapter | E | decode ms/step kept | restacked | kept / restacked (IQR) | prefill ms kept | "
             "restacked | kept / restacked (IQR) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['E']} | {r['decode_kept_ms']:.2f} | {r['decode_restacked_ms']:.2f} | "
                     f"{r['decode_ratio']:.3f} ({r['decode_q1']:.3f}-{r['decode_q3']:.3f}) | "
                     f"{r['prefill_kept_ms']:.2f} | {r['prefill_restacked_ms']:.2f} | "
                     f"{r['prefill_ratio']:.3f} ({r['prefill_q1']:.3f}-{r['prefill_q3']:.3f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
