"""Full-model training step time, tokens/s and peak memory of the four methods, fused vs loop; merged inference.

Training: for lora (E=1), lora_moe (dense router, E separate A/B pairs), asymlora (task-routed, shared A,
E B heads) and asymlora_moe (dense router, shared A) at every E of ``--experts``, and PEFT's LoRA
(``peft_lora``: ``peft.get_peft_model`` with a ``LoraConfig`` of the same target modules, rank, alpha and
dropout, trained by the same optimizer on the same batch -- the LoRA a user would otherwise pick), one full
training step
(forward, LM loss + balance loss for routed methods, backward, AdamW step over the trainable parameters,
zero_grad) of a whole decoder, median over ``--iters`` steps after ``--warmup``. Each is measured twice:

- ``fused``: asymlora's layer (``get_model``): one matmul for A, one for the stacked B heads;
- ``loop``: the formulation of reference implementations, injected into the same ``nn.Linear`` modules:
  one ``nn.Linear`` per ``A_e`` / ``B_e`` and a Python loop ``sum_e g_e * B_e(A(x))`` (``A_e`` per expert
  for LoRA-MoE), with the same router (fp32 ``nn.Linear`` + softmax), task one-hot gates, scaling,
  adapter dtype and Switch balance loss.

PEFT's LoRA is one row (impl ``peft``). With ``--paired`` (the default) every fused row is timed round by
round against asymlora's LoRA and against PEFT's LoRA in one process, so each method has a ratio to both
(the ``lora`` row has its ratio to PEFT's, the ``peft_lora`` row its ratio to asymlora's).

Inference: forward latency (prefill, logits of the last position) of the plain base model, the adapter
model unmerged, and merged with ``model.merge(task=0)`` (lora, task-routed asymlora; asymlora_moe cannot be
merged and is reported unmerged), timed round-robin so the three see the same machine state; and, with
``--decode-tokens`` (default per preset), the per-token step of greedy decoding with a KV cache after the
prefill. ``--no-train`` times inference only.

The decoder is a randomly initialised ``LlamaForCausalLM`` (timing does not depend on weight values);
inputs are random token ids (text only: the decoder is the cost). Presets:

- ``tiny``: a 2-layer toy decoder (a smoke test; seconds on CPU);
- ``default``: SmolLM2-135M's shape (the default model's language model: hidden 576, intermediate 1536,
  30 layers, 9 heads, 3 kv heads, vocab 49152);
- ``7b``: LLaMA-7B's shape (hidden 4096, intermediate 11008, 32 heads, vocab 32000) with only
  ``--layers`` decoder layers (default 4), bf16: per-layer representative (GPU).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over each configuration's steps. On CPU there
is no allocator statistic, so with ``--isolate`` (the default on CPU, except for the tiny preset) every
training configuration runs in a fresh subprocess and its peak RSS (``getrusage`` max RSS, which includes
the Python/torch runtime and the model weights) is reported; without isolation, CPU memory is "n/a".

    python benchmarks/speed.py --preset tiny                  # smoke test
    python benchmarks/speed.py                                # default preset on the available device
    python benchmarks/speed.py --preset 7b --device cuda      # LLaMA-7B-shaped layers, bf16
    python benchmarks/speed.py --compile [--pair-with-eager]  # steps of the torch.compile'd model
    python benchmarks/speed.py --matched-budget               # each method at LoRA's parameter count

Every method runs at the same rank r (the issue's targets are stated at the same r), or, with
``--matched-budget``, at the rank whose trainable adapter parameters come closest to LoRA's at r, as the
quality benchmark compares them.

Writes ``benchmarks/results/speed_<preset>_<device>[_budget].{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asymlora import AsymLoraConfig, AsymLoraModel, find_target_modules, get_model
from asymlora.config import TORCH_DTYPES, LayerSpec, rank_for_budget
from asymlora.io import write_json_atomic, write_text_atomic
from asymlora.routing import balance_loss

METHODS = ("lora", "lora_moe", "asymlora", "asymlora_moe", "peft_lora")
IMPLS = ("fused", "loop")
PEFT_IMPL = "peft"  # the impl of the peft_lora row: PEFT's own LoRA layers (neither fused nor loop)
ROUTING = {"lora": "-", "lora_moe": "dense", "asymlora": "task", "asymlora_moe": "dense", "peft_lora": "-"}
LORA_REFERENCE = ("lora", 1, "fused")
PEFT_REFERENCE = ("peft_lora", 1, PEFT_IMPL)
RESULT_TAG = "@@SPEED_RESULT "
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # --compile MODE

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=True)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False)

# Per preset: the model shape, r, and per-device run sizes (layers, batch, seq, dtype, warmup, iters).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model=TINY, r=4, experts=(3, 4, 8),
                 cpu=dict(layers=2, batch=2, seq=16, dtype="float32", warmup=1, iters=2, decode=4),
                 cuda=dict(layers=2, batch=2, seq=16, dtype="float32", warmup=1, iters=2, decode=4)),
    # CPU: all 30 layers at 256 tokens/step, 2 + 9 steps per configuration (with 3 timed steps, the same
    # configuration's ratio to LoRA moved by up to 0.25 between runs on 2 shared cores). --layers 8 is ~3x
    # quicker, but the tied 49152-word LM head (~8 layers' worth of compute) then weighs more and dilutes
    # every ratio.
    "default": dict(model=SMOLLM2_135M, r=16, experts=(3, 4, 8),
                    cpu=dict(layers=30, batch=2, seq=128, dtype="float32", warmup=2, iters=9, decode=16),
                    cuda=dict(layers=30, batch=8, seq=512, dtype="bfloat16", warmup=3, iters=10, decode=32)),
    "7b": dict(model=LLAMA_7B, r=32, experts=(3, 4, 8),
               cpu=dict(layers=1, batch=1, seq=64, dtype="float32", warmup=1, iters=2, decode=4),
               cuda=dict(layers=4, batch=8, seq=1024, dtype="bfloat16", warmup=3, iters=10, decode=32)),
}


@dataclass
class Settings:
    """Everything one run depends on (JSON-serialisable: it is handed to isolated subprocesses)."""

    preset: str
    device: str
    model: dict[str, Any]
    layers: int
    batch: int
    seq: int
    r: int
    alpha: float
    dtype: str
    adapter_dtype: str
    experts: list[int]
    methods: list[str]
    impls: list[str]
    warmup: int
    iters: int
    balance_weight: float
    grad_ckpt: bool
    isolate: bool
    inference: bool
    seed: int = 0
    routing_stats: bool = True
    count_ops: bool = True
    paired: bool = True
    compile: str = ""  # "" (eager) or a torch.compile mode: the training steps run the compiled model
    pair_with_eager: bool = False  # with compile: pair each configuration with itself run eagerly
    decode_tokens: int = 0  # inference: greedy decoding steps timed per round (0: prefill only)
    train: bool = True  # time the training configurations (False: inference only)
    # --matched-budget: the rank of each "method:E" whose trainable adapter parameters come closest to LoRA's
    # at r (empty: every method at r, the matched-rank comparison)
    ranks: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- models
def build_base(s: Settings) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the preset's shape with ``s.layers`` layers, frozen."""
    import transformers as tf

    torch.manual_seed(s.seed)
    config = tf.LlamaConfig(**{**s.model, "num_hidden_layers": s.layers}, use_cache=False)
    with torch.device(s.device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[s.dtype], attn_implementation="sdpa")
    model.requires_grad_(False)
    return model


def rank_of(method: str, experts: int, s: Settings) -> int:
    """The rank ``method`` runs at: ``s.r``, or its matched-budget rank (``--matched-budget``)."""
    return s.ranks.get(f"{method}:{experts}", s.r)


def adapter_config(method: str, experts: int, s: Settings, r: int | None = None) -> AsymLoraConfig:
    """The asymlora config of one benchmarked method (all linear layers of the decoder), at ``r`` (default:
    :func:`rank_of`); alpha keeps the ratio alpha / r of ``s``, so every rank has the same scaling."""
    r = rank_of(method, experts, s) if r is None else r
    common = dict(r=r, alpha=s.alpha * r / s.r, adapter_dtype=s.adapter_dtype,
                  balance_loss_weight=s.balance_weight, target_modules="all-linear")
    if method in ("lora", "peft_lora"):  # peft_lora: PEFT's LoraConfig is built from this one
        return AsymLoraConfig(method="lora", **common)
    if method == "asymlora":
        return AsymLoraConfig(method="asymlora", routing="task", tasks=[f"task{i}" for i in range(experts)], **common)
    return AsymLoraConfig(method=method, routing="dense", num_experts=experts, **common)


def adapter_parameters(method: str, experts: int, r: int, s: Settings) -> int:
    """Trainable adapter parameters (A, B banks, routers) of ``method`` at rank ``r`` on the benchmarked
    decoder, counted on a meta-device copy (no weights are allocated)."""
    with torch.device("meta"):
        base = build_base(replace(s, device="meta"))
    wrapped = get_model(base, adapter_config(method, experts, s, r))
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def budget_ranks(s: Settings) -> dict[str, int]:
    """Each (method, E)'s rank whose trainable adapter parameters come closest to LoRA's at ``s.r`` (ties to
    the lower rank), as ``benchmarks/quality.py`` matches its budgets: the comparison at equal parameters
    instead of equal rank. Keys "method:E"."""
    budget = adapter_parameters("lora", 1, s.r, s)
    jobs = sorted({(m, e) for m, e, _ in train_jobs(s)} | set(inference_groups(s)))
    return {f"{method}:{experts}": rank_for_budget(lambda r, m=method, e=experts: adapter_parameters(m, e, r, s),
                                                   budget, s.r)[0]
            for method, experts in jobs if method not in ("lora", "peft_lora")}


class LoopContext:
    """Per-forward state shared by the loop layers: task ids, and router outputs for the balance loss."""

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None
        self.collecting = False
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []


class LoopLinear(nn.Module):
    """The reference formulation of one adapted layer: per-expert ``nn.Linear`` modules and a Python loop.

    ``y = W x + s * sum_e g_e(x) * B_e(A_(e)(x))`` with ``g`` = softmax of an fp32 router (dense; top-k:
    the k largest, renormalised for k > 1, as :func:`asymlora.routing.topk_routing`), the one-hot of the
    sample's task (task routing) or 1 (LoRA); same parameters, dtypes and scaling as
    :class:`asymlora.AsymLoraLinear` for the same :class:`~asymlora.config.LayerSpec` (hybrid routing is
    not reproduced). ``benchmarks/layer_speed.py`` times it layer by layer.
    """

    def __init__(self, base: nn.Linear, spec: LayerSpec, context: LoopContext,
                 adapter_dtype: str = "float32") -> None:
        super().__init__()
        if spec.routing == "hybrid":
            raise ValueError("LoopLinear: hybrid routing has no loop reference here")
        self.base_layer = base
        self.spec = spec
        self.context = context
        self.scaling = spec.scaling
        weight = base.weight
        dtype = weight.dtype if adapter_dtype == "auto" else TORCH_DTYPES[adapter_dtype]
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, spec.r, bias=False, **factory)
                                    for _ in range(spec.num_A))
        self.lora_B = nn.ModuleList(nn.Linear(spec.r, base.out_features, bias=False, **factory)
                                    for _ in range(spec.num_experts))
        for head in self.lora_B:
            nn.init.zeros_(head.weight)
        self.router: nn.Linear | None = None
        if spec.has_router:
            self.router = nn.Linear(base.in_features, spec.num_experts, device=weight.device, dtype=torch.float32)
            nn.init.normal_(self.router.weight, std=0.02)
            nn.init.zeros_(self.router.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        experts = self.spec.num_experts
        xa = x.to(self.lora_A[0].weight.dtype)
        if self.router is not None:
            probs = F.softmax(self.router(x.float()), dim=-1)
            if self.spec.routing == "topk":
                values, indices = probs.topk(self.spec.top_k, dim=-1)
                if self.spec.top_k > 1:
                    values = values / values.sum(dim=-1, keepdim=True)
                gates = torch.zeros_like(probs).scatter(-1, indices, values)
                dispatch = torch.zeros_like(probs).scatter(-1, indices, 1.0 / self.spec.top_k)
            else:
                gates = probs
                dispatch = F.one_hot(probs.detach().argmax(-1), experts).to(probs.dtype)
            if self.context.collecting:
                self.context.records.append((probs.reshape(-1, experts), dispatch.reshape(-1, experts).detach()))
            gates = gates.to(xa.dtype)
        elif experts > 1:
            ids = self.context.task_ids
            gates = F.one_hot(ids.to(x.device), experts).to(xa.dtype).view(ids.shape[0], *([1] * (x.dim() - 2)),
                                                                           experts)
        else:
            gates = None
        shared = self.lora_A[0](xa) if len(self.lora_A) == 1 else None
        delta: torch.Tensor | None = None
        for e in range(experts):
            codes = shared if shared is not None else self.lora_A[e](xa)
            term = self.lora_B[e](codes)
            if gates is not None:
                term = gates[..., e:e + 1] * term
            delta = term if delta is None else delta + term
        return out + (delta * self.scaling).to(out.dtype)


def compile_module(module: nn.Module, mode: str) -> Callable[..., Any]:
    """``torch.compile(module)`` with inductor and ``mode``, one of :data:`COMPILE_MODES` ("default" is
    torch.compile's own default)."""
    return torch.compile(module, mode=None if mode == "default" else mode)


class Variant:
    """One adapted model being benchmarked: ``loss(batch)`` and ``detach()`` (restore the plain base)."""

    impl = ""

    def __init__(self, base: nn.Module, config: AsymLoraConfig, names: list[str]) -> None:
        self.base = base
        self.config = config
        self.names = names
        self.call: Callable[..., Any] = self.model  # what ``loss`` runs: the model, or its compiled form

    def compile(self, mode: str) -> None:
        """Run the model under ``torch.compile`` from now on, as the Trainer's ``torch_compile`` does: the
        whole model, graph breaks included."""
        self.call = compile_module(self.model, mode)

    @property
    def model(self) -> nn.Module:
        return self.base

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def detach(self) -> None:
        """Put the original ``nn.Linear`` modules back (frozen); the variant is unusable afterwards."""
        for name in self.names:
            parent_name, _, child = name.rpartition(".")
            parent = self.base.get_submodule(parent_name) if parent_name else self.base
            setattr(parent, child, getattr(parent, child).base_layer)
        self.base.requires_grad_(False)


class FusedVariant(Variant):
    """asymlora's own layers (``get_model``); the loss is what the trainer optimises, and with
    ``routing_stats`` each step also accumulates the routing statistics, as ``asymlora train`` does."""

    impl = "fused"

    def __init__(self, base: nn.Module, config: AsymLoraConfig, routing_stats: bool = True) -> None:
        self.wrapped: AsymLoraModel = get_model(base, config)
        self.routing_stats = routing_stats
        super().__init__(base, config, list(self.wrapped.adapter_layers))

    @property
    def model(self) -> nn.Module:
        return self.wrapped

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.wrapped.collect_routing_stats() if self.routing_stats else contextlib.nullcontext():
            out = self.call(input_ids=batch["input_ids"], labels=batch["labels"], task_ids=batch["task_ids"])
        aux = self.wrapped.aux_loss
        weight = self.config.balance_loss_weight
        return out.loss + weight * aux if weight and aux.requires_grad else out.loss


class LoopVariant(Variant):
    """The same targets as ``get_model``, adapted by :class:`LoopLinear`; same loss (LM + balance)."""

    impl = "loop"

    def __init__(self, base: nn.Module, config: AsymLoraConfig) -> None:
        names = find_target_modules(base, config)
        super().__init__(base, config, names)
        base.requires_grad_(False)
        self.context = LoopContext()
        self.layers: dict[str, LoopLinear] = {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            layer = LoopLinear(getattr(parent, child), config.spec_for(name), self.context, config.adapter_dtype)
            layer.base_layer.requires_grad_(False)
            setattr(parent, child, layer)
            self.layers[name] = layer

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx = self.context
        ctx.task_ids, ctx.records, ctx.collecting = batch["task_ids"], [], self.base.training
        try:
            out = self.call(input_ids=batch["input_ids"], labels=batch["labels"])
        finally:
            ctx.collecting = False  # gradient checkpointing re-runs layers in backward: record once
        weight = self.config.balance_loss_weight
        if not (weight and ctx.records):
            return out.loss
        mask = (batch["labels"] != -100).reshape(-1)
        aux = sum(balance_loss(probs, dispatch, mask) for probs, dispatch in ctx.records)
        ctx.records = []
        return out.loss + weight * aux


class PeftVariant(Variant):
    """PEFT's LoRA (``peft.get_peft_model``) on the modules asymlora adapts, at the same rank, alpha, dropout
    (and rsLoRA flag); adapter weights in float32 on a low-precision base, as asymlora's default adapter
    dtype (PEFT's ``autocast_adapter_dtype``). The loss is the LM loss."""

    impl = PEFT_IMPL

    def __init__(self, base: nn.Module, config: AsymLoraConfig) -> None:
        from peft import LoraConfig, get_peft_model

        names = find_target_modules(base, config)
        lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          use_rslora=config.use_rslora, target_modules=names, bias="none")
        self.peft_model = get_peft_model(base, lora, autocast_adapter_dtype=config.adapter_dtype == "float32")
        super().__init__(base, config, names)

    @property
    def model(self) -> nn.Module:
        return self.peft_model

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.call(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def detach(self) -> None:
        self.peft_model.unload()  # the LoRA layers replaced by their base layers, in ``base``
        self.base.requires_grad_(False)


def attach(base: nn.Module, method: str, experts: int, impl: str, s: Settings) -> Variant:
    """Adapt ``base`` in place with one method in one formulation (compiled with ``--compile``)."""
    config = adapter_config(method, experts, s)
    if method == "peft_lora":
        variant: Variant = PeftVariant(base, config)
    elif impl == "fused":
        variant = FusedVariant(base, config, s.routing_stats)
    else:
        variant = LoopVariant(base, config)
    if s.compile:
        variant.compile(s.compile)
    return variant


@torch.no_grad()
def copy_fused_to_loop(fused: FusedVariant, loop: LoopVariant) -> None:
    """Give the loop layers exactly the fused layers' adapter weights (A rows, B heads, router)."""
    for name, src in fused.wrapped.adapter_layers.items():
        dst = loop.layers[name]
        r = src.spec.r
        for a, lin in enumerate(dst.lora_A):
            lin.weight.copy_(src.A_bank[a * r:(a + 1) * r])
        for e, lin in enumerate(dst.lora_B):
            lin.weight.copy_(src.B_bank[e])
        if src.router is not None:
            dst.router.weight.copy_(src.router.weight)
            dst.router.bias.copy_(src.router.bias)


@torch.no_grad()
def randomize_b(variant: Variant, std: float = 0.02, seed: int = 0) -> None:
    """Non-zero B heads (B starts at zero), so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(variant, FusedVariant):
        tensors = [layer.B_bank for layer in variant.wrapped.adapter_layers.values()]
    else:
        tensors = [lin.weight for layer in variant.layers.values() for lin in layer.lora_B]
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=gen).to(t) * std)


def make_batch(s: Settings, experts: int) -> dict[str, torch.Tensor]:
    """Random token ids (batch, seq), labels = ids, task ids cycling over the E tasks."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(0, s.model["vocab_size"], (s.batch, s.seq), generator=gen)
    return {"input_ids": ids.to(s.device), "labels": ids.clone().to(s.device),
            "task_ids": (torch.arange(s.batch) % max(experts, 1)).to(s.device)}


# ---------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _rss_mib() -> float | None:
    """The current resident set size of this process (psutil, else /proc), or None."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_mib() -> float | None:
    """This process's peak RSS so far (``getrusage``), or None where unavailable."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _free(device: str, collect: bool = True) -> None:
    """Collect garbage (tens to hundreds of ms: skipped for the toy model) and return cached CUDA memory."""
    if collect:
        gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def make_optimizer(params: Sequence[nn.Parameter], lr: float = 1e-4) -> torch.optim.Optimizer:
    """The optimizer ``asymlora train`` builds by default: the Trainer's class and keyword arguments for
    default ``TrainingArguments`` (fused AdamW in transformers 5 with torch >= 2.8, on CPU as on CUDA)."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.gettempdir(), learning_rate=lr, report_to=[])
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return optimizer_cls(list(params), **kwargs)


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    flags = [k for k in ("fused", "foreach") if optimizer.defaults.get(k)]
    return type(optimizer).__name__ + (f" ({', '.join(flags)})" if flags else "")


def train_step(variant: Variant, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               device: str) -> tuple[float, float, torch.Tensor]:
    """One training step; (seconds of forward + loss + backward, seconds of the optimizer step, loss)."""
    start = time.perf_counter()
    loss = variant.loss(batch)
    loss.backward()
    _sync(device)
    middle = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return middle - start, time.perf_counter() - middle, loss.detach()


def references_of(method: str, experts: int, impl: str, itself: bool = False,
                  peft: bool = True) -> list[tuple[str, int, str]]:
    """The configurations a row is paired with: asymlora's LoRA and (with ``peft``) PEFT's LoRA for every
    method (each LoRA with the other one), asymlora's fused layer for the loop formulation; the row's own
    configuration with ``itself`` (``--pair-with-eager``: compiled against eager)."""
    if itself:
        return [(method, experts, impl)]
    if impl == "loop":
        return [(method, experts, "fused")]
    references = [LORA_REFERENCE] + ([PEFT_REFERENCE] if peft else [])
    return [ref for ref in references if ref != (method, experts, impl)]


def paired_ratios(s: Settings, variant: Variant, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                  references: Sequence[tuple[str, int, str]]) -> dict:
    """Step-time ratios to each of ``references``, all models in this process, timed round by round.

    On a shared machine the speed of the whole host drifts by +-10-30% over minutes, more than the effects
    measured here, so the ratio of two medians taken minutes apart (the "x LoRA" column) carries that drift.
    Here each round times one step of every reference and one of the configuration back to back (the order
    rotates from round to round and is reversed every other round, so none is always first: ABBA with one
    reference) and the ratios are taken per round; the median and quartiles of those ratios are reported.
    Each reference is a freshly built model of the same seed, adapted with its own method, and run eagerly
    with ``s.pair_with_eager`` (else compiled as the configuration is). Keys ``paired_*`` hold the ratio to
    the first reference that is not PEFT's LoRA, ``peft_paired_*`` the ratio to PEFT's LoRA.
    """
    built = []
    try:
        for ref_method, ref_experts, ref_impl in references:
            ref_base = build_base(s)
            ref_variant = attach(ref_base, ref_method, ref_experts, ref_impl,
                                 replace(s, compile="") if s.pair_with_eager else s)
            ref_variant.model.train()
            built.append((ref_variant, make_batch(s, ref_experts), make_optimizer(ref_variant.trainable())))
        steps = [(variant, batch, optimizer), *built]
        n = len(steps)
        ratios = [{"step": [], "fwd_bwd": []} for _ in built]
        for model_variant, model_batch, model_optimizer in steps * max(1, s.warmup):
            train_step(model_variant, model_batch, model_optimizer, s.device)
        for i in range(s.iters):
            order = [(k + i) % n for k in range(n)]
            timed: dict[int, tuple[float, float]] = {}
            for j in (order if i % 2 == 0 else order[::-1]):
                fwd_bwd, opt, _ = train_step(*steps[j], s.device)
                timed[j] = (fwd_bwd + opt, fwd_bwd)
            for k, part in enumerate(ratios, 1):
                part["step"].append(timed[0][0] / timed[k][0])
                part["fwd_bwd"].append(timed[0][1] / timed[k][1])
    finally:
        for ref_variant, _, ref_optimizer in built:
            ref_optimizer.state.clear()
            ref_variant.detach()
        del built
        _free(s.device, s.preset != "tiny")
    eager = " eager" if s.pair_with_eager else ""
    result: dict[str, Any] = {}
    for (ref_method, ref_experts, ref_impl), part in zip(references, ratios, strict=True):
        prefix = "peft_paired" if ref_method == "peft_lora" else "paired"
        if f"{prefix}_with" in result:
            continue
        step_q = _quartiles(part["step"])
        result.update({f"{prefix}_with": f"{ref_method} E={ref_experts} {ref_impl}{eager}",
                       f"{prefix}_rounds": s.iters, f"{prefix}_ratio": step_q[1], f"{prefix}_q1": step_q[0],
                       f"{prefix}_q3": step_q[2], f"{prefix}_fwd_bwd_ratio": _quartiles(part["fwd_bwd"])[1]})
    return result


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, statistics.median(values), q3


def run_train_config(s: Settings, method: str, experts: int, impl: str, base: nn.Module | None = None) -> dict:
    """Time full training steps of one (method, E, formulation); builds the base model when not given.

    ``base`` is adapted in place and restored afterwards. Memory: CUDA peak allocated; on CPU, the process's
    peak RSS when this function runs alone in a fresh process (``isolated``), else None. Memory, operator
    counts and saved bytes are taken before the paired rounds (:func:`paired_ratios`) build their reference.
    """
    isolated = base is None
    if s.compile:  # a fresh compile cache: configurations of one process would otherwise pile up recompiles
        torch._dynamo.reset()
    if base is None:
        base = build_base(s)
    batch = make_batch(s, experts)
    variant = attach(base, method, experts, impl, s)
    model = variant.model
    model.train()
    if s.grad_ckpt:  # transformers 5.24 renamed gradient_checkpointing_* to activation_checkpointing_*
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = variant.trainable()
    optimizer = make_optimizer(params)
    cuda = s.device.startswith("cuda")
    _free(s.device, s.preset != "tiny")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start_mib = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mib()
    last: list[torch.Tensor] = []
    phases: dict[str, list[float]] = {"fwd_bwd": [], "optimizer": []}

    def step() -> None:
        fwd_bwd, opt, loss = train_step(variant, batch, optimizer, s.device)
        phases["fwd_bwd"].append(fwd_bwd)
        phases["optimizer"].append(opt)
        last[:] = [loss]

    paired: dict[str, Any] = {}
    try:
        times = time_calls(step, s.device, s.warmup, s.iters)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else (_max_rss_mib() if isolated else None)
        loss_value = float(last[0]) if last else float("nan")
        ops = count_ops(lambda: variant.loss(batch).backward()) if s.count_ops else None
        optimizer.zero_grad(set_to_none=True)
        saved = saved_activation_bytes(lambda: variant.loss(batch), list(model.parameters()))
        references = references_of(method, experts, impl, s.pair_with_eager, peft="peft_lora" in s.methods)
        if s.paired and references:
            paired = paired_ratios(s, variant, batch, optimizer, references)
    finally:
        if s.grad_ckpt:
            getattr(base, "activation_checkpointing_disable", base.gradient_checkpointing_disable)()
        optimizer.state.clear()
        variant.detach()
        _free(s.device, s.preset != "tiny")
    median = statistics.median(times)
    measured = {name: values[-len(times):] for name, values in phases.items()}  # the timed calls, not warmup
    return dict(method=method, E=experts, impl=impl, routing=ROUTING[method], r=rank_of(method, experts, s),
                ms=median * 1e3,
                ms_min=min(times) * 1e3, tokens_per_s=s.batch * s.seq / median,
                fwd_bwd_ms=statistics.median(measured["fwd_bwd"]) * 1e3,
                optimizer_ms=statistics.median(measured["optimizer"]) * 1e3,
                optimizer=_optimizer_name(optimizer), peak_mib=peak, start_mib=start_mib,
                peak_above_start_mib=None if peak is None or start_mib is None else peak - start_mib,
                trainable=sum(p.numel() for p in params), loss=loss_value, ops=ops,
                saved_act_mib=saved / 2**20, train_state_mib=trainable_state_bytes(params) / 2**20, **paired)


def saved_activation_bytes(forward: Callable[[], Any], params: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward of one ``forward()`` (each storage once,
    parameters' storages left out): the activations a training step holds at its peak, counted exactly,
    without the allocator's and the process's noise that RSS carries."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    skip = {p.untyped_storage().data_ptr() for p in params}
    return sum(size for ptr, size in storages.items() if ptr not in skip)


def trainable_state_bytes(params: Sequence[torch.Tensor]) -> int:
    """Trainable parameters, their gradients and AdamW's two moments (each in the parameter's dtype)."""
    return sum(4 * p.numel() * p.element_size() for p in params)


def leaf_aten_ops(events: Any) -> int:
    """How many of a profile's events are leaf ATen operators (no operators under them)."""
    return sum(1 for event in events if event.name.startswith("aten::") and not event.cpu_children)


def count_ops(fn: Callable[[], Any]) -> int:
    """Leaf ATen operators that one call of ``fn`` dispatches (profiled once, after the timed steps): each
    is at least one kernel launch on a GPU, so on small models this count, not FLOPs, sets the pace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return leaf_aten_ops(prof.events())


def _run_isolated(s: Settings, method: str, experts: int, impl: str) -> dict:
    job = json.dumps({"settings": asdict(s), "method": method, "E": experts, "impl": impl})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", job,
                           "--threads", str(torch.get_num_threads())],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"isolated run of {method} E={experts} {impl} failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def train_jobs(s: Settings) -> list[tuple[str, int, str]]:
    """(method, E, formulation) in measurement order: fused then loop for each (method, E); none with
    ``--no-train``."""
    jobs: list[tuple[str, int, str]] = []
    if not s.train:
        return jobs
    for method in s.methods:
        if method == "peft_lora":
            jobs.append(PEFT_REFERENCE)
            continue
        for experts in ([1] if method == "lora" else s.experts):
            jobs.extend((method, experts, impl) for impl in s.impls)
    return jobs


def bench_train(s: Settings, base: nn.Module | None, log: Callable[[str], None],
                on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every training configuration's row; ``on_row(rows so far)`` after each (for partial results)."""
    rows = []
    jobs = train_jobs(s)
    begin = time.perf_counter()
    for i, (method, experts, impl) in enumerate(jobs, 1):
        if s.isolate:
            row = _run_isolated(s, method, experts, impl)
        else:
            row = run_train_config(s, method, experts, impl, base)
        rows.append(row)
        log(f"[{i}/{len(jobs)}] train {method:12s} E={experts} {impl:5s} {row['ms']:10.2f} ms/step "
            f"{row['tokens_per_s']:10.0f} tok/s  (elapsed {time.perf_counter() - begin:.0f} s)")
        if on_row is not None:
            on_row(rows)
    return rows


def _cache_argument() -> str:
    """The KV cache's name in the decoder's forward and output: ``cache`` in newer transformers releases
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    import transformers as tf

    return "cache" if "cache" in inspect.signature(tf.LlamaForCausalLM.forward).parameters else "past_key_values"


def _prefill(model: nn.Module, prompt: torch.Tensor, kwargs: dict) -> None:
    """One forward of the whole prompt without a KV cache, logits of the last position only."""
    model(input_ids=prompt, use_cache=False, logits_to_keep=1, **kwargs)


def _decode_seconds(model: nn.Module, prompt: torch.Tensor, steps: int, kwargs: dict, device: str) -> float:
    """Seconds per greedy decoding step (one new token per sample, KV cache) over ``steps`` steps after an
    untimed prefill of ``prompt``."""
    name = _cache_argument()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **kwargs)
    past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{name: past}, **kwargs)
        past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
    _sync(device)
    return (time.perf_counter() - start) / steps


def inference_groups(s: Settings) -> list[tuple[str, int]]:
    """(method, E) of the inference rows: LoRA, task-routed AsymLoRA at every E, dense at the largest E."""
    if not s.inference:
        return []
    groups = [("lora", 1)] if "lora" in s.methods else []
    if "asymlora" in s.methods:
        groups += [("asymlora", e) for e in s.experts]
    if "asymlora_moe" in s.methods and s.experts:
        groups.append(("asymlora_moe", max(s.experts)))
    return groups


def bench_inference(s: Settings, base: nn.Module, log: Callable[[str], None]) -> list[dict]:
    """Latency of the plain base vs the adapter unmerged vs merged (task 0), timed round-robin: prefill
    (one forward of the batch, logits of the last position) and, with ``s.decode_tokens``, the per-token
    step of greedy decoding with a KV cache (one token per sample)."""
    plain = copy.deepcopy(base).eval()
    kinds = ("base", "unmerged", "merged")
    rows = []
    for method, experts in inference_groups(s):
        batch = make_batch(s, experts)
        variant = attach(base, method, experts, "fused", s)
        randomize_b(variant, seed=s.seed)
        wrapped = variant.wrapped
        wrapped.eval()
        mergeable = method != "asymlora_moe"

        def kwargs(adapter: bool, batch: dict = batch) -> dict:
            return {"task_ids": batch["task_ids"] * 0} if adapter else {}

        @torch.inference_mode()
        def forward(model: nn.Module, adapter: bool, batch: dict = batch) -> None:
            _prefill(model, batch["input_ids"], kwargs(adapter))

        @torch.inference_mode()
        def decode(model: nn.Module, adapter: bool, batch: dict = batch) -> float:
            return _decode_seconds(model, batch["input_ids"], s.decode_tokens, kwargs(adapter), s.device)

        times: dict[str, list[float]] = {k: [] for k in kinds}
        decode_times: dict[str, list[float]] = {k: [] for k in kinds}

        def measure(key: str, model: nn.Module, adapter: bool, keep: bool, times: dict = times,
                    decode_times: dict = decode_times) -> None:
            t = time_calls(lambda: forward(model, adapter), s.device, 0, 1)[0]
            d = decode(model, adapter) if s.decode_tokens else None
            if keep:
                times[key].append(t)
                if d is not None:
                    decode_times[key].append(d)

        try:
            for i in range(s.warmup + s.iters):
                keep = i >= s.warmup
                measure("base", plain, False, keep)
                measure("unmerged", wrapped, True, keep)
                if mergeable:
                    wrapped.merge(task=0)
                    try:
                        measure("merged", wrapped, True, keep)
                    finally:
                        wrapped.unmerge()
        finally:
            wrapped.unmerge()
            variant.detach()
            _free(s.device, s.preset != "tiny")
        med = {k: statistics.median(v) * 1e3 if v else None for k, v in times.items()}
        dec = {k: statistics.median(v) * 1e3 if v else None for k, v in decode_times.items()}

        def over_base(values: dict, key: str) -> float | None:
            return None if values[key] is None or not values["base"] else values[key] / values["base"]

        row = dict(method=method, E=experts, r=rank_of(method, experts, s), base_ms=med["base"],
                   unmerged_ms=med["unmerged"],
                   merged_ms=med["merged"], unmerged_vs_base=over_base(med, "unmerged"),
                   merged_vs_base=over_base(med, "merged"))
        if s.decode_tokens:
            row.update(decode_tokens=s.decode_tokens, decode_base_ms=dec["base"], decode_unmerged_ms=dec["unmerged"],
                       decode_merged_ms=dec["merged"], decode_unmerged_vs_base=over_base(dec, "unmerged"),
                       decode_merged_vs_base=over_base(dec, "merged"))
        rows.append(row)
        merged = "n/a" if row["merged_ms"] is None else f"{row['merged_ms']:.2f}"
        log(f"infer {method:12s} E={experts} base {row['base_ms']:.2f} ms, unmerged {row['unmerged_ms']:.2f} ms, "
            f"merged {merged} ms" + (f"; decode per token base {dec['base']:.2f} ms, unmerged "
                                     f"{dec['unmerged']:.2f} ms, merged {_fmt(dec['merged'])} ms"
                                     if s.decode_tokens else ""))
    del plain
    _free(s.device, s.preset != "tiny")
    return rows


# ---------------------------------------------------------------------------------------- report
def _find(rows: list[dict], method: str, experts: int, impl: str = "fused") -> dict | None:
    return next((r for r in rows if r["method"] == method and r["E"] == experts and r["impl"] == impl), None)


def target_checks(train: list[dict], infer: list[dict], experts: Sequence[int]) -> list[dict]:
    """The issue's targets as measured ratios (reported, never asserted)."""
    checks = []
    lora = _find(train, "lora", 1)

    def add(name: str, value: float | None, op: str, target: float) -> None:
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        checks.append(dict(target=name, value=value, op=op, bound=target, met=met))

    def add_ratio(name: str, ratio: tuple[float | None, bool], op: str, target: float) -> None:
        value, paired = ratio
        if value is not None:
            add(name + (" (paired)" if paired else ""), value, op, target)

    for e in experts:
        moe, task = _find(train, "asymlora_moe", e), _find(train, "asymlora", e)
        if lora and moe:
            add_ratio(f"asymlora_moe E={e} step / lora step", _ratio(moe, lora, "step"), "<=", 1.10)
        if lora and task:
            add_ratio(f"asymlora (task) E={e} step / lora step", _ratio(task, lora, "step"), "<=", 1.03)
            # the step less AdamW over E B heads
            add_ratio(f"asymlora (task) E={e} forward+backward / lora's", _ratio(task, lora, "fwd_bwd"), "<=", 1.03)
        loop = _find(train, "asymlora_moe", e, "loop")
        if moe and loop and e == max(experts):
            add_ratio(f"asymlora_moe E={e} loop step / fused step", _ratio(loop, moe, "step"), ">=", 2.0)
        for row, label in ((moe, "asymlora_moe"), (task, "asymlora (task)")):
            if lora and row and lora["peak_mib"] and row["peak_mib"]:
                add(f"{label} E={e} peak memory / lora", row["peak_mib"] / lora["peak_mib"], "<=", 1.05)
            if lora and row and _exact_mib(lora) and _exact_mib(row):
                add(f"{label} E={e} saved activations + trainable state / lora", _exact_mib(row) / _exact_mib(lora),
                    "<=", 1.05)
    for row in infer:
        if row["merged_vs_base"] is not None:
            add(f"{row['method']} E={row['E']} merged inference / base", row["merged_vs_base"], "<=", 1.01)
    return checks


# (paired ratio key, median key) of each part of a step
_RATIO_KEYS = {"step": ("paired_ratio", "ms"), "fwd_bwd": ("paired_fwd_bwd_ratio", "fwd_bwd_ms")}


def _ratio(row: dict, reference: dict, part: str) -> tuple[float | None, bool]:
    """``row``'s time over ``reference``'s for one part of the step ("step" or "fwd_bwd"), and whether it is
    paired: the per-round median where ``row`` was paired with that reference (:func:`paired_ratios`), else
    the ratio of the two rows' medians (None where either lacks it)."""
    paired_key, median_key = _RATIO_KEYS[part]
    if row.get(paired_key) is not None and row.get("paired_with") == _label(reference):
        return row[paired_key], True
    if row.get(median_key) and reference.get(median_key):
        return row[median_key] / reference[median_key], False
    return None, False


def _label(row: dict) -> str:
    return f"{row['method']} E={row['E']} {row['impl']}"


def _paired_cell(row: dict, prefix: str = "paired") -> str:
    """The paired ratio with its interquartile range, e.g. ``1.06 (1.02-1.09)``; empty when not measured.
    ``prefix``: ``paired`` (the row's reference) or ``peft_paired`` (PEFT's LoRA)."""
    if row.get(f"{prefix}_ratio") is None:
        return ""
    return f"{row[f'{prefix}_ratio']:.3f} ({row[f'{prefix}_q1']:.2f}-{row[f'{prefix}_q3']:.2f})"


def _exact_mib(row: dict) -> float | None:
    """Saved activations + trainable state (rows of runs before these were counted have neither)."""
    if row.get("saved_act_mib") is None or row.get("train_state_mib") is None:
        return None
    return row["saved_act_mib"] + row["train_state_mib"]


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_int(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def to_markdown(result: dict) -> str:
    env, train, infer = result["environment"], result["train"], result["inference"]
    optimizer = train[0].get("optimizer") if train else None  # runs before it was recorded: plain AdamW
    lines = [
        f"## Full-model speed, preset {result['preset']}: {env['device_name']}",
        "",
    ]
    if not result.get("complete", True):
        lines += [f"**Partial: {len(train)} of {result.get('planned_train_configurations', '?')} training "
                  "configurations measured, no inference rows (the run stopped before the end).**", ""]
    lines += [
        f"- model: {env['model_desc']} (random weights), {env['layers']} decoder layers, {env['dtype']}, "
        f"adapters {env['adapter_dtype']}, all-linear targets ({env['adapted_linears']} adapted nn.Linear)",
        f"- batch {env['batch']} x seq {env['seq']} = {env['batch'] * env['seq']} tokens/step, "
        + (f"ranks matched to LoRA's trainable adapter parameters at r={env['r']} (column r; alpha / r = "
           f"{env['alpha'] / env['r']:g})" if env.get("ranks") else f"r={env['r']}, alpha={env['alpha']:g}")
        + f", balance weight {env['balance_weight']:g}, gradient checkpointing "
        f"{'on' if env['grad_ckpt'] else 'off'}, "
        + (f"{optimizer} (the Trainer's default, as `asymlora train` builds it)" if optimizer else "AdamW"),
        "- routing statistics (expert load, entropy, per-task load) accumulated every step by the fused "
        + ("routed methods, as `asymlora train` does; the loop formulation collects none"
           if env.get("routing_stats") else "methods: off (--no-routing-stats)"),
        f"- median of {env['iters']} after {env['warmup']} warmup; torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['threads']} CPU threads",
        "- " + (f"training steps of the `torch.compile`d model (inductor, mode {env['compile']!r}; the warmup steps "
                "compile; every configuration and its paired reference compiled alike); inference eager"
                if env.get("compile") else "eager (no torch.compile)"),
        f"- memory: {env['memory']}",
        "- paired: each configuration timed round by round against its reference in one process ("
        + ("the same configuration run eagerly: compiled / eager" if env.get("pair_with_eager") else
           "asymlora's LoRA for asymlora's layers and for PEFT's LoRA, the fused layer for the loop formulation")
        + "; and, in its own column, against PEFT's LoRA (`peft.get_peft_model`, same targets, r, alpha, dropout, "
        "optimizer and batch) where that row is run; the order rotates every round and reverses every other "
        "one); the median of the per-round step-time ratios, with the interquartile range. The other "
        "ratio columns (x LoRA, x PEFT) divide medians taken minutes apart, and carry the host's drift",
        "- ATen ops: leaf ATen operators dispatched by one forward+backward (torch.profiler, after the timed "
        "steps); each is at least one kernel launch on a GPU",
        "- saved act: bytes of the tensors autograd saves for backward in one forward (each storage once, "
        "parameters left out); train state: trainable parameters + gradients + AdamW's two moments. Both are "
        "counted, not sampled, so they carry none of the allocator's noise",
        "",
        "### Training step (forward + loss + backward + AdamW step)",
        "",
        "| method | routing | E | r | impl | ms/step | fwd+bwd ms | AdamW ms | tokens/s | x LoRA | fwd+bwd x LoRA "
        "| x PEFT | loop / fused | paired: step x reference (IQR) | paired: step x PEFT LoRA (IQR) | peak MiB "
        "| peak - start MiB | mem x LoRA | saved act MiB | train state MiB "
        "| act + state x LoRA | trainable | ATen ops fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lora = _find(train, "lora", 1)
    peft = _find(train, *PEFT_REFERENCE)
    for r in train:
        fused = _find(train, r["method"], r["E"])
        vs_fused = _fmt(r["ms"] / fused["ms"]) if r["impl"] == "loop" and fused else ""
        x_lora = _fmt(r["ms"] / lora["ms"]) if lora else "n/a"
        x_peft = _fmt(r["ms"] / peft["ms"]) if peft else "n/a"
        fb_lora = _fmt(r["fwd_bwd_ms"] / lora["fwd_bwd_ms"]) if lora and lora.get("fwd_bwd_ms") and r.get("fwd_bwd_ms") else "n/a"
        mem_x = _fmt(r["peak_mib"] / lora["peak_mib"], ".3f") if lora and lora["peak_mib"] and r["peak_mib"] else "n/a"
        exact_x = _fmt(_exact_mib(r) / _exact_mib(lora), ".3f") if lora and _exact_mib(lora) and _exact_mib(r) else "n/a"
        lines.append(f"| {r['method']} | {r['routing']} | {r['E']} | {r.get('r', env['r'])} | {r['impl']} | "
                     f"{r['ms']:.2f} | "
                     f"{_fmt(r.get('fwd_bwd_ms'))} | {_fmt(r.get('optimizer_ms'))} | "
                     f"{r['tokens_per_s']:.0f} | {x_lora} | {fb_lora} | {x_peft} | {vs_fused} | {_paired_cell(r)} | "
                     f"{_paired_cell(r, 'peft_paired')} | "
                     f"{_fmt(r['peak_mib'], '.0f')} | "
                     f"{_fmt(r['peak_above_start_mib'], '.0f')} | {mem_x} | {_fmt(r.get('saved_act_mib'), '.1f')} | "
                     f"{_fmt(r.get('train_state_mib'), '.1f')} | {exact_x} | "
                     f"{r['trainable']:,} | {_fmt_int(r.get('ops'))} |")
    if infer:
        lines += ["", "### Inference latency (prefill forward, logits of the last position)", "",
                  "| adapter | E | r | base ms | unmerged ms | merged ms | unmerged / base | merged / base |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in infer:
            lines.append(f"| {r['method']} | {r['E']} | {r.get('r', env['r'])} | {r['base_ms']:.2f} | {r['unmerged_ms']:.2f} | "
                         f"{_fmt(r['merged_ms'])} | {r['unmerged_vs_base']:.3f} | {_fmt(r['merged_vs_base'], '.3f')} |")
        decoded = [r for r in infer if r.get("decode_tokens")]
        if decoded:
            lines += ["", f"### Decode latency (greedy, KV cache: ms per step of one new token per sample, "
                      f"median over rounds of {decoded[0]['decode_tokens']} steps)", "",
                      "| adapter | E | r | base ms | unmerged ms | merged ms | unmerged / base | merged / base |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in decoded:
                lines.append(f"| {r['method']} | {r['E']} | {r.get('r', env['r'])} | {r['decode_base_ms']:.2f} | {r['decode_unmerged_ms']:.2f} | "
                             f"{_fmt(r['decode_merged_ms'])} | {r['decode_unmerged_vs_base']:.3f} | "
                             f"{_fmt(r['decode_merged_vs_base'], '.3f')} |")
    if result["targets"]:
        lines += ["", "### Targets (measured ratios; reported, not asserted)", ""]
        if env.get("ranks"):
            lines += ["At a matched parameter budget, not at the same r: the issue's step-time targets are stated "
                      "at the same r, so these rows answer a neighbouring question.", ""]
        lines += ["| target | measured | bound | within |", "|---|---|---|---|"]
        for c in result["targets"]:
            within = "n/a" if c["met"] is None else ("yes" if c["met"] else "no")
            lines.append(f"| {c['target']} | {_fmt(c['value'], '.3f')} | {c['op']} {c['bound']:g} | {within} |")
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _memory_mode(s: Settings) -> str:
    if s.device.startswith("cuda"):
        return ("torch.cuda.max_memory_allocated per configuration (includes the model weights); "
                "start = allocated before the first step")
    if s.isolate:
        return ("peak RSS (getrusage) of a fresh subprocess per configuration: includes the Python/torch "
                "runtime and the model weights; start = RSS after building the model")
    return "n/a on CPU without --isolate (no allocator statistics)"


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: per preset and device)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--r", type=int, default=None, help="LoRA rank (default: per preset)")
    parser.add_argument("--alpha", type=float, default=None, help="default: 2 r")
    parser.add_argument("--experts", type=int, nargs="+", default=None, help="E values (default: 3 4 8)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default=None, help="base model dtype")
    parser.add_argument("--adapter-dtype", choices=("float32", "auto"), default="float32",
                        help="adapter parameters: float32 (asymlora's default) or the base dtype")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--balance-weight", type=float, default=0.01)
    parser.add_argument("--grad-ckpt", action="store_true", help="non-reentrant gradient checkpointing")
    parser.add_argument("--routing-stats", action=argparse.BooleanOptionalAction, default=True,
                        help="fused: accumulate the routing statistics every step, as asymlora train does (the "
                             "loop formulation, like the reference code, collects none)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one fresh subprocess per training configuration (CPU peak RSS); default: on for "
                             "CPU except the tiny preset")
    parser.add_argument("--no-inference", dest="inference", action="store_false")
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="time inference only (no training configurations)")
    parser.add_argument("--decode-tokens", type=int, default=None,
                        help="inference: greedy decoding steps (KV cache) timed per round after the prefill; "
                             "0 times the prefill only (default: per preset)")
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each configuration round by round against its reference (LoRA for "
                             "asymlora's layers, the fused layer for the loop formulation) in one process, and "
                             "report the median per-round ratio (robust to the host's drift; doubles the steps)")
    parser.add_argument("--no-count-ops", dest="count_ops", action="store_false",
                        help="skip counting the ATen operators of one forward+backward per configuration")
    parser.add_argument("--compile", nargs="?", const="default", default="", choices=COMPILE_MODES,
                        help="time training steps of the torch.compile'd model (inductor; optional MODE, default "
                             "'default'); at least 2 warmup steps, which compile. Inference rows stay eager")
    parser.add_argument("--pair-with-eager", action="store_true",
                        help="with --compile: pair each configuration with itself run eagerly (the paired column "
                             "is then compiled / eager) instead of with LoRA, every row LoRA's included")
    parser.add_argument("--matched-budget", action="store_true",
                        help="run every method at the rank whose trainable adapter parameters come closest to "
                             "LoRA's at --r (as benchmarks/quality.py does) instead of at --r itself; writes "
                             "speed_<preset>_<device>_budget.{json,md}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    preset = PRESETS[args.preset]
    run = preset["cuda" if device == "cuda" else "cpu"]
    r = args.r or preset["r"]

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    if not (args.train or args.inference):
        raise SystemExit("--no-train with --no-inference: nothing to time")
    if args.pair_with_eager and not (args.compile and args.paired):
        raise SystemExit("--pair-with-eager: needs --compile, and --paired (the default)")
    isolate = args.isolate if args.isolate is not None else (device == "cpu" and args.preset != "tiny")
    s = Settings(
        preset=args.preset, device=device, model=dict(preset["model"]), layers=pick(args.layers, run["layers"]),
        batch=pick(args.batch, run["batch"]), seq=pick(args.seq, run["seq"]), r=r,
        alpha=pick(args.alpha, 2.0 * r), dtype=pick(args.dtype, run["dtype"]), adapter_dtype=args.adapter_dtype,
        experts=list(args.experts or preset["experts"]), methods=list(args.methods), impls=list(args.impls),
        # compiled: the first step compiles, the second recompiles once the routing statistics' totals exist
        warmup=max(pick(args.warmup, run["warmup"]), 2 if args.compile else 0), iters=max(1, pick(args.iters, run["iters"])),
        balance_weight=args.balance_weight, grad_ckpt=args.grad_ckpt, routing_stats=args.routing_stats,
        count_ops=args.count_ops, paired=args.paired, isolate=bool(isolate) and device == "cpu",
        inference=args.inference, seed=args.seed, compile=args.compile, pair_with_eager=args.pair_with_eager,
        decode_tokens=max(0, pick(args.decode_tokens, run["decode"])), train=args.train,
    )
    return replace(s, ranks=budget_ranks(s)) if args.matched_budget else s


def _child(job_json: str) -> None:
    job = json.loads(job_json)
    s = Settings(**job["settings"])
    row = run_train_config(s, job["method"], job["E"], job["impl"])
    print(RESULT_TAG + json.dumps(row), flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; writes ``<out-dir>/speed_<preset>_<device>.{json,md}`` and returns the result."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.child:
            _child(args.child)
            return {}
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    s = resolve_settings(args)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    import transformers

    begin = time.perf_counter()
    base = build_base(s)
    adapted = len(find_target_modules(base, adapter_config("lora", 1, s)))
    shape = s.model
    env = dict(
        device_name=_device_name(s.device), torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
        model_desc=(f"LlamaForCausalLM hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
                    f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} kv, "
                    f"vocab {shape['vocab_size']}"),
        base_parameters=sum(p.numel() for p in base.parameters()), adapted_linears=adapted,
        memory=_memory_mode(s), **{k: v for k, v in asdict(s).items() if k != "model"}, model=s.model,
    )
    if s.device.startswith("cuda"):
        env["weights_mib"] = torch.cuda.memory_allocated() / 2**20
    log(f"preset {s.preset} on {env['device_name']}: {s.layers} layers, {s.dtype}, batch {s.batch} x seq {s.seq}, "
        f"r={s.r}, E={s.experts}, {len(train_jobs(s))} training configurations"
        f"{' (one subprocess each)' if s.isolate else ''}")
    if s.isolate:
        del base
        _free(s.device, s.preset != "tiny")
        base = None
    stem = Path(args.out_dir) / (f"speed_{s.preset}_{'cuda' if s.device.startswith('cuda') else 'cpu'}"
                                 + ("_budget" if s.ranks else ""))
    planned = len(train_jobs(s))

    def write(train: list[dict], infer: list[dict], complete: bool) -> dict:
        """The result so far, written after every configuration: a run cut short by a time limit keeps
        what it measured (``complete`` false, the table says which configurations are missing)."""
        result = dict(preset=s.preset, environment=env, train=train, inference=infer, complete=complete,
                      planned_train_configurations=planned,
                      targets=target_checks(train, infer, s.experts), seconds=time.perf_counter() - begin)
        write_json_atomic(stem.with_suffix(".json"), result)
        write_text_atomic(stem.with_suffix(".md"), to_markdown(result))
        return result

    train = bench_train(s, base, log, on_row=lambda rows: write(rows, [], False)) if s.train else []
    infer: list[dict] = []
    if s.inference:
        if base is None:
            base = build_base(s)
        infer = bench_inference(s, base, log)
    result = write(train, infer, True)
    log(to_markdown(result))
    log(f"wrote {stem}.json and {stem}.md in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
