"""Forward+backward time of one adapted linear layer: asymlora's fused layer vs a plain-loop formulation.

For each method (lora, lora_moe, asymlora task-routed, asymlora_moe dense/topk) and E, times
``y = layer(x); y.backward(grad)`` with a frozen base weight and an input that requires grad (as inside
a network), and compares with the loop formulation that reference implementations use: one
``nn.Linear`` per expert and a Python loop ``sum_e g_e * B_e(A(x))`` (``A_e`` per expert for LoRA-MoE).

    python benchmarks/layer_speed.py                  # CPU shapes (SmolLM2-135M MLP), float32
    python benchmarks/layer_speed.py --preset 7b      # 4096 -> 11008, 4096 tokens, r=32, bf16 (GPU)

Writes ``benchmarks/results/layer_speed_<preset>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asymlora import AsymLoraConfig, AsymLoraLinear
from asymlora.io import write_json_atomic, write_text_atomic
from asymlora.model import RoutingContext

PRESETS = {
    "tiny": dict(d_in=64, d_out=96, tokens=64, r=4, experts=(3,), dtype="float32"),  # a smoke test of the script
    "small": dict(d_in=576, d_out=1536, tokens=2048, r=16, experts=(3, 8), dtype="float32"),
    "7b": dict(d_in=4096, d_out=11008, tokens=4096, r=32, experts=(3, 8), dtype="bfloat16"),
}


class LoopLayer(nn.Module):
    """The reference formulation: a Python loop over per-expert nn.Linear modules."""

    def __init__(self, base: nn.Linear, r: int, experts: int, shared_A: bool, routing: str, top_k: int = 2):
        super().__init__()
        self.base = base
        n_A = 1 if shared_A else experts
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, r, bias=False) for _ in range(n_A))
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(experts))
        self.router = nn.Linear(base.in_features, experts, bias=False) if routing != "task" else None
        self.routing, self.top_k, self.experts, self.scaling = routing, top_k, experts, 2.0
        for b in self.lora_B:
            nn.init.normal_(b.weight, std=0.01)

    def forward(self, x: torch.Tensor, task_onehot: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base(x)
        if self.router is None:
            gates = task_onehot
        else:
            probs = F.softmax(self.router(x.float()), dim=-1)
            if self.routing == "topk":
                values, idx = probs.topk(self.top_k, dim=-1)
                gates = torch.zeros_like(probs).scatter(-1, idx, values / values.sum(-1, keepdim=True))
            else:
                gates = probs
        gates = gates.to(x.dtype)
        shared = self.lora_A[0](x) if len(self.lora_A) == 1 else None
        for e in range(self.experts):
            a = shared if shared is not None else self.lora_A[e](x)
            out = out + gates[..., e:e + 1] * self.lora_B[e](a) * self.scaling
        return out


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


def bench(preset: str, device: torch.device, warmup: int, iters: int) -> list[dict]:
    p = PRESETS[preset]
    dtype = getattr(torch, p["dtype"]) if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = nn.Linear(p["d_in"], p["d_out"], bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(p["tokens"] // 4, 4, p["d_in"], device=device, dtype=dtype)  # (batch, seq, d)
    grad = torch.randn(p["tokens"] // 4, 4, p["d_out"], device=device, dtype=dtype)
    rows = []

    def run(module, extra=None):
        def step():
            xi = x.detach().requires_grad_(True)
            y = module(xi) if extra is None else module(xi, extra)
            y.backward(grad)
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

    frozen_step = run(base)
    record("base (frozen linear)", 0, base, frozen_step, "-")
    lora = AsymLoraLinear(base, AsymLoraConfig(method="lora", r=p["r"]).layer_spec(), "lora",
                          adapter_dtype="auto").to(device)
    lora.routing_context = RoutingContext()
    record("lora", 1, lora, run(lora), "fused")
    for experts in p["experts"]:
        tasks = [f"t{i}" for i in range(experts)]
        task_ids = torch.arange(x.shape[0], device=device) % experts
        onehot = F.one_hot(task_ids, experts).unsqueeze(1).expand(-1, x.shape[1], -1).to(dtype)
        methods = [
            ("asymlora (task)", dict(method="asymlora", tasks=tasks), True, "task"),
            ("asymlora_moe (dense)", dict(method="asymlora_moe", num_experts=experts, routing="dense"), True, "dense"),
            ("asymlora_moe (top2)", dict(method="asymlora_moe", num_experts=experts, routing="topk", top_k=2),
             True, "topk"),
            ("lora_moe (dense)", dict(method="lora_moe", num_experts=experts, routing="dense"), False, "dense"),
        ]
        for name, kwargs, shared, routing in methods:
            layer = AsymLoraLinear(base, AsymLoraConfig(r=p["r"], **kwargs).layer_spec(), name,
                                   adapter_dtype="auto").to(device)
            ctx = RoutingContext()
            ctx.task_ids = task_ids
            layer.routing_context = ctx
            record(name, experts, layer, run(layer), "fused")
            loop = LoopLayer(base, p["r"], experts, shared, routing).to(device=device, dtype=dtype)
            if loop.router is not None:
                loop.router.float()
            record(name, experts, loop, run(loop, onehot), "loop")
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    lora_ms = next(r["ms"] for r in rows if r["method"] == "lora")
    lines = [header, "", "| method | E | impl | ms (median) | x LoRA | x fused | peak MiB | trainable |",
             "|---|---|---|---|---|---|---|---|"]
    fused = {(r["method"], r["E"]): r["ms"] for r in rows if r["impl"] == "fused"}
    for r in rows:
        vs_fused = f"{r['ms'] / fused[(r['method'], r['E'])]:.2f}" if r["impl"] == "loop" else ""
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['method']} | {r['E']} | {r['impl']} | {r['ms']:.3f} | {r['ms'] / lora_ms:.2f} | "
            f"{vs_fused} | {peak} | {r['trainable']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = bench(args.preset, device, args.warmup, args.iters)
    p = PRESETS[args.preset]
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    dtype = p["dtype"] if device.type == "cuda" else "float32"
    header = (f"## Layer fwd+bwd, preset {args.preset}: {p['d_in']} -> {p['d_out']}, {p['tokens']} tokens, r={p['r']}, "
              f"{dtype}, {dev_name}, torch {torch.__version__}")
    stem = Path(args.out) / f"layer_speed_{args.preset}_{device.type}"
    write_json_atomic(stem.with_suffix(".json"), {"preset": args.preset, **p, "dtype": dtype, "device": dev_name,
                                                  "torch": torch.__version__, "rows": rows})
    md = to_markdown(rows, header)
    write_text_atomic(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
