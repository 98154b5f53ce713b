"""Where task routing's two paths cross: per-sample heads against the gated product, by tokens per sample.

Task-routed AsymLoRA has two exact forms of its update (see "Task routing" in ``asymlora.layer``):
the per-sample heads, ``baddbmm(W X, codes, B_bank[task_ids]^T)``, whose FLOPs are LoRA's but which copy one
(d_out, r) head per sample (and scatter their gradients back in backward); and the gated product over the
stacked bank, ``addmm(W X, g * codes, B_stacked^T)``, with E times LoRA's B FLOPs and no per-sample copy. The
layer takes the per-sample heads when ``(E - 1) * tokens per sample >= TASK_BMM_MIN_WORK``. This script
times both paths (forced by setting that constant to 0 or to infinity) on one adapted layer, forward +
backward, at a fixed number of tokens split into samples of 1 to 1024 tokens, and reports where they cross
and what the constant picks at each length.

Each length is timed in alternating rounds (per-sample, gated, LoRA, repeated), and the median per path is
reported, so the host's drift over minutes falls on all three alike.

    python benchmarks/task_path_crossover.py                       # 576 -> 1536, 2048 tokens, r=16, E=3 and 8
    python benchmarks/task_path_crossover.py --preset tiny --rounds 2   # a smoke test

Writes ``benchmarks/results/task_path_crossover_<preset>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import asymlora.layer
from asymlora import AsymLoraConfig, AsymLoraLinear
from asymlora.io import write_json_atomic, write_text_atomic
from asymlora.routing import RoutingContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_speed import device_label  # noqa: E402

PRESETS = {
    "tiny": dict(d_in=64, d_out=96, tokens=64, r=4, experts=(3,), lengths=(1, 4, 16, 64)),
    "small": dict(d_in=576, d_out=1536, tokens=2048, r=16, experts=(3, 8), lengths=(1, 4, 8, 16, 32, 64, 256, 1024)),
}


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    module(x.detach().requires_grad_(True)).backward(grad)


def _once(device: torch.device, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds of one forward + backward of ``module`` on ``x``."""
    start = time.perf_counter()
    _forward_backward(module, x, grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(preset: str, device: torch.device, warmup: int, rounds: int) -> list[dict]:
    p = PRESETS[preset]
    torch.manual_seed(0)
    base = nn.Linear(p["d_in"], p["d_out"], bias=False, device=device).requires_grad_(False)
    lora = AsymLoraLinear(base, AsymLoraConfig(method="lora", r=p["r"]).layer_spec(), "lora",
                          adapter_dtype="auto").to(device)
    lora.routing_context = RoutingContext()
    rows = []
    for experts in p["experts"]:
        spec = AsymLoraConfig(method="asymlora", r=p["r"], tasks=[f"t{i}" for i in range(experts)]).layer_spec()
        layer = AsymLoraLinear(base, spec, "task", adapter_dtype="auto").to(device)
        with torch.no_grad():  # B is zero-initialised; give it values so the product is not trivially zero
            layer.B_bank.normal_(std=0.02)
        for length in p["lengths"]:
            samples = p["tokens"] // length
            x = torch.randn(samples, length, p["d_in"], device=device)
            grad = torch.randn(samples, length, p["d_out"], device=device)
            ctx = RoutingContext()
            ctx.task_ids = torch.arange(samples, device=device) % experts
            layer.routing_context = ctx

            paths = {"per_sample": 0, "gated": math.inf}
            times: dict[str, list[float]] = {"per_sample": [], "gated": [], "lora": []}
            for i in range(warmup + rounds):
                for name, threshold in paths.items():
                    asymlora.layer.TASK_BMM_MIN_WORK = threshold
                    seconds = _once(device, layer, x, grad)
                    if i >= warmup:
                        times[name].append(seconds)
                seconds = _once(device, lora, x, grad)
                if i >= warmup:
                    times["lora"].append(seconds)
            asymlora.layer.TASK_BMM_MIN_WORK = CONSTANT
            ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
            picks = "per_sample" if (experts - 1) * length >= CONSTANT else "gated"
            faster = min(paths, key=lambda name: ms[name])
            rows.append(dict(E=experts, tokens_per_sample=length, samples=samples, work=(experts - 1) * length,
                             lora_ms=ms["lora"], per_sample_ms=ms["per_sample"], gated_ms=ms["gated"],
                             faster=faster, picked=picks, picked_over_best=ms[picks] / ms[faster]))
            print(f"E={experts} L={length:5d}: per-sample {ms['per_sample']:8.2f} ms, gated {ms['gated']:8.2f} ms, "
                  f"LoRA {ms['lora']:8.2f} ms; picks {picks} ({ms[picks] / ms[faster]:.2f}x the faster)", flush=True)
    return rows


def crossings(rows: list[dict]) -> dict[int, float | None]:
    """Per E, the geometric midpoint of the first pair of measured lengths where the faster path turns
    from gated to per-sample (None if it never does)."""
    out: dict[int, float | None] = {}
    for experts in sorted({r["E"] for r in rows}):
        mine = [r for r in rows if r["E"] == experts]
        out[experts] = next((math.sqrt(a["tokens_per_sample"] * b["tokens_per_sample"]) for a, b in zip(mine, mine[1:])
                             if a["faster"] == "gated" and b["faster"] == "per_sample"), None)
    return out


def to_markdown(rows: list[dict], crossed: dict[int, float | None], header: str) -> str:
    lines = [header, "", "| E | tokens per sample | (E-1) x L | LoRA ms | per-sample heads ms | gated product ms | "
             "faster | layer picks | picked / faster |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['E']} | {r['tokens_per_sample']} | {r['work']} | {r['lora_ms']:.2f} | {r['per_sample_ms']:.2f} | "
                     f"{r['gated_ms']:.2f} | {r['faster']} | {r['picked']} | {r['picked_over_best']:.2f} |")
    lines.append("")
    for experts, length in crossed.items():
        where = "never within the measured lengths" if length is None else \
            f"near L = {length:.0f} tokens per sample, (E-1) x L = {(experts - 1) * length:.0f}"
        lines.append(f"- E={experts}: the per-sample heads become the faster path {where}.")
    worst = max(rows, key=lambda r: r["picked_over_best"])
    lines.append(f"- TASK_BMM_MIN_WORK = {CONSTANT}: the path it picks is at most {worst['picked_over_best']:.2f}x the "
                 f"faster one (E={worst['E']}, L={worst['tokens_per_sample']}).")
    return "\n".join(lines) + "\n"


CONSTANT = asymlora.layer.TASK_BMM_MIN_WORK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = bench(args.preset, device, args.warmup, args.rounds)
    crossed = crossings(rows)
    p = PRESETS[args.preset]
    dev_name = device_label(device)
    header = (f"## Task routing's two paths, preset {args.preset}: {p['d_in']} -> {p['d_out']}, {p['tokens']} tokens, "
              f"r={p['r']}, float32, forward + backward, median of {args.rounds} alternating rounds, {dev_name}, "
              f"torch {torch.__version__}")
    stem = Path(args.out) / f"task_path_crossover_{args.preset}_{device.type}"
    write_json_atomic(stem.with_suffix(".json"), {
        "preset": args.preset, **{k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "device": dev_name, "torch": torch.__version__, "rounds": args.rounds, "task_bmm_min_work": CONSTANT,
        "crossings": {str(k): v for k, v in crossed.items()}, "rows": rows})
    md = to_markdown(rows, crossed, header)
    write_text_atomic(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
