"""Forward+backward time of one adapted linear layer: asymlora's fused layer vs a plain-loop formulation.

For each method (lora, lora_moe, asymlora task-routed, asymlora_moe dense/topk) and E, times
``y = layer(x); y.backward(grad)`` with a frozen base weight and an input that requires grad (as inside
a network), and compares with the loop formulation that reference implementations use: one
``nn.Linear`` per expert and a Python loop ``sum_e g_e * B_e(A(x))`` (``A_e`` per expert for LoRA-MoE),
i.e. ``speed.py``'s :class:`LoopLinear`, which the full-model benchmark uses and tests against the fused layer.

    python benchmarks/layer_speed.py                  # CPU shapes (SmolLM2-135M MLP), float32
    python benchmarks/layer_speed.py --preset 7b      # 4096 -> 11008, 4096 tokens, r=32, bf16 (GPU)

Writes ``benchmarks/results/layer_speed_<preset>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from asymlora import AsymLoraConfig, AsymLoraLinear
from asymlora.io import write_json_atomic, write_text_atomic
from asymlora.routing import RoutingContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import (  # noqa: E402  (the full-model benchmark's loop reference and compile modes)
    COMPILE_MODES,
    LoopContext,
    LoopLinear,
    compile_module,
    leaf_aten_ops,
)

PRESETS = {
    "tiny": dict(d_in=64, d_out=96, tokens=64, r=4, experts=(3,), dtype="float32"),  # a smoke test of the script
    "small": dict(d_in=576, d_out=1536, tokens=2048, r=16, experts=(3, 8), dtype="float32"),
    "7b": dict(d_in=4096, d_out=11008, tokens=4096, r=32, experts=(3, 8), dtype="bfloat16"),
}


def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def time_fn(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """Median and min seconds per call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def profile_step(step, device: torch.device, top: int) -> dict:
    """One call of ``step`` under torch.profiler: its leaf ATen operators, its GPU kernels (None on CPU), and
    the ``top`` operators by self time on the device (CPU time on a CPU), as [name, calls, microseconds]."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    ops = leaf_aten_ops(events)
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA) if cuda else None
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    averages.sort(key=lambda e: getattr(e, key), reverse=True)
    return {"aten_ops": ops, "kernels": kernels, "time": "device" if cuda else "cpu",
            "top": [[e.key, e.count, round(float(getattr(e, key)), 1)] for e in averages[:top]]}


def bench(preset: str, device: torch.device, warmup: int, iters: int, profile_top: int = 0,
          compile_mode: str = "") -> list[dict]:
    """Rows of every configuration; with ``compile_mode`` each fused layer is also timed under
    ``torch.compile`` (inductor, that mode; impl "compiled"), right after its eager row."""
    p = PRESETS[preset]
    dtype = getattr(torch, p["dtype"]) if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = nn.Linear(p["d_in"], p["d_out"], bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(p["tokens"] // 4, 4, p["d_in"], device=device, dtype=dtype)  # (batch, seq, d)
    grad = torch.randn(p["tokens"] // 4, 4, p["d_out"], device=device, dtype=dtype)
    rows = []

    def run(module):
        def step():
            xi = x.detach().requires_grad_(True)
            module(xi).backward(grad)
        return step

    def record(name, experts, module, step, kind):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        median, best = time_fn(step, device, warmup, iters)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        params = sum(q.numel() for q in module.parameters() if q.requires_grad)
        rows.append(dict(method=name, E=experts, impl=kind, ms=median * 1e3, ms_min=best * 1e3, peak_mib=peak,
                         trainable=params))
        if profile_top:
            rows[-1]["profile"] = profile_step(step, device, profile_top)

    frozen_step = run(base)
    record("base (frozen linear)", 0, base, frozen_step, "-")
    lora = AsymLoraLinear(base, AsymLoraConfig(method="lora", r=p["r"]).layer_spec(), "lora",
                          adapter_dtype="auto").to(device)
    lora.routing_context = RoutingContext()

    def record_fused(name: str, experts: int, layer: AsymLoraLinear) -> None:
        record(name, experts, layer, run(layer), "fused")
        if compile_mode:
            torch._dynamo.reset()  # each layer compiles afresh (no recompile limit across configurations)
            record(name, experts, layer, run(compile_module(layer, compile_mode)), "compiled")

    record_fused("lora", 1, lora)
    for experts in p["experts"]:
        tasks = [f"t{i}" for i in range(experts)]
        task_ids = torch.arange(x.shape[0], device=device) % experts
        methods = [
            ("asymlora (task)", dict(method="asymlora", tasks=tasks)),
            ("asymlora_moe (dense)", dict(method="asymlora_moe", num_experts=experts, routing="dense")),
            ("asymlora_moe (top2)", dict(method="asymlora_moe", num_experts=experts, routing="topk", top_k=2)),
            ("lora_moe (dense)", dict(method="lora_moe", num_experts=experts, routing="dense")),
        ]
        for name, kwargs in methods:
            spec = AsymLoraConfig(r=p["r"], **kwargs).layer_spec()
            layer = AsymLoraLinear(base, spec, name, adapter_dtype="auto").to(device)
            ctx = RoutingContext()
            ctx.task_ids = task_ids
            layer.routing_context = ctx
            record_fused(name, experts, layer)
            loop_ctx = LoopContext()
            loop_ctx.task_ids = task_ids
            loop = LoopLinear(base, spec, loop_ctx, adapter_dtype="auto")
            record(name, experts, loop, run(loop), "loop")
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    lora_ms = next(r["ms"] for r in rows if r["method"] == "lora")
    # with compiled rows, also their ratio to compiled LoRA: the gap that compiling leaves
    lora_compiled = next((r["ms"] for r in rows if r["method"] == "lora" and r["impl"] == "compiled"), None)
    has_compiled = any(r["impl"] == "compiled" for r in rows)
    columns = ["method", "E", "impl", "ms (median)", "x LoRA", "x fused", *(["x compiled LoRA"] * has_compiled),
               "peak MiB", "trainable"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    fused = {(r["method"], r["E"]): r["ms"] for r in rows if r["impl"] == "fused"}
    for r in rows:
        vs_fused = f"{r['ms'] / fused[(r['method'], r['E'])]:.2f}" if r["impl"] in ("loop", "compiled") else ""
        vs_compiled = f"{r['ms'] / lora_compiled:.2f}" if r["impl"] == "compiled" and lora_compiled else ""
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        cells = [r["method"], r["E"], r["impl"], f"{r['ms']:.3f}", f"{r['ms'] / lora_ms:.2f}", vs_fused,
                 *([vs_compiled] * has_compiled), peak, f"{r['trainable']:,}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        unit = "device" if profiled[0]["profile"]["time"] == "device" else "CPU"
        lines += ["", f"### One call under torch.profiler: operators, kernels, and the top operators by self {unit} "
                  "time (µs, calls)", "", "| method | E | impl | ATen ops | kernels | top operators |", "|---|---|---|---|---|---|"]
        for r in profiled:
            prof = r["profile"]
            top = "; ".join(f"{name} {us:.0f} ({calls})" for name, calls, us in prof["top"])
            kernels = "" if prof["kernels"] is None else prof["kernels"]
            lines.append(f"| {r['method']} | {r['E']} | {r['impl']} | {prof['aten_ops']} | {kernels} | {top} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile one call of each configuration: operator and kernel counts and the N "
                             "operators with the most self time (default 0: off)")
    parser.add_argument("--compile", nargs="?", const="default", default="", choices=COMPILE_MODES,
                        help="also time each fused layer under torch.compile (inductor; optional MODE); the warmup "
                             "calls compile, so keep --warmup >= 2")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = bench(args.preset, device, args.warmup, args.iters, args.profile, args.compile)
    p = PRESETS[args.preset]
    dev_name = device_label(device)
    dtype = p["dtype"] if device.type == "cuda" else "float32"
    header = (f"## Layer fwd+bwd, preset {args.preset}: {p['d_in']} -> {p['d_out']}, {p['tokens']} tokens, r={p['r']}, "
              f"{dtype}, {dev_name}, torch {torch.__version__}"
              + (f"; impl compiled: torch.compile (inductor, mode {args.compile!r}) of the fused layer" if args.compile else ""))
    stem = Path(args.out) / f"layer_speed_{args.preset}_{device.type}"
    write_json_atomic(stem.with_suffix(".json"), {"preset": args.preset, **p, "dtype": dtype, "device": dev_name,
                                                  "torch": torch.__version__, "compile": args.compile, "rows": rows})
    md = to_markdown(rows, header)
    write_text_atomic(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
