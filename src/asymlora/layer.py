"""The one adapter layer: wraps a frozen ``nn.Linear`` for all four methods.

Semantics (x: one token, W: frozen base weight, s = alpha/r or alpha/sqrt(r) with use_rslora,
A_bank: (n_A*r, d_in), B_bank: (E, d_out, r), g(x): the gate of :mod:`asymlora.routing`):

- lora          (n_A = 1, E = 1):  y = W x + s * B_0 A x
- asymlora      (n_A = 1, E):      y = W x + s * sum_e g_e(x) * B_e A x,  g = onehot(task)
- asymlora_moe  (n_A = 1, E):      y = W x + s * sum_e g_e(x) * B_e A x,  g = dense / topk / hybrid router
- lora_moe      (n_A = E, E):      y = W x + s * sum_e g_e(x) * B_e A_e x, A_e = rows [e*r, (e+1)*r) of A_bank

Dropout (p = dropout) applies to the x fed to A, never to the base path or the router.

Fused computation for T tokens (no Python loop over experts):
    codes = dropout(X) A_bank^T                               (T, n_A*r)   one matmul
    gated = g[:, :, None] * codes.view(T, n_A, r)             (T, E, r)    broadcast over E if n_A = 1
    Y     = addmm(W X + b, gated.reshape(T, E*r), B_stacked^T, alpha=s)   (T, d_out)   one matmul,
with B_stacked = B_bank.permute(1, 0, 2).reshape(d_out, E*r). The scaling s and the residual add ride in
that one addmm (BLAS's C = beta C + alpha A B), so neither is a pass of its own over the (T, d_out) output,
forward or backward; where the base output's dtype differs from the adapter's (a bf16 model with a float32
adapter), s scales the small factor instead and the product is cast and added.

Task routing (no router, E > 1) has a one-hot gate that is the same for every token of a sample, so the
gated product above would spend E times LoRA's FLOPs multiplying zeros. There, for N samples of L tokens,
the same sum is taken with each sample's own head, still in one batched matmul:
    codes = dropout(X) A_bank^T                               (N, L, r)    (n_A = E: A_(task) gathered)
    Y     = baddbmm(W X + b, codes, B_bank[task_ids]^T, alpha=s)           LoRA's FLOPs, no expert loop
The gathered heads B_bank[task_ids] are N copies of (d_out, r), and their backward scatters N gradients back:
that costs more than the zero gates when samples are short (a decoding step has L = 1). So the per-sample
path is taken only when (E - 1) * L >= TASK_BMM_MIN_WORK, where the FLOPs it saves, (E - 1) L r d_out per
sample, outweigh the copy of d_out r; shorter samples take the gated product. The threshold is where the
two paths cross on CPU (``benchmarks/task_path_crossover.py``, docs/benchmarks.md).

In inference (eval mode, no gradient) B_stacked is kept between forwards while the bank is unchanged
(:meth:`AsymLoraLinear._inference_stacked`): a decoding step multiplies one token per sample, so the copy
would otherwise be a large share of its memory traffic (``benchmarks/inference_cache.py``,
docs/benchmarks.md).

What backward keeps: the bank products are autograd Functions of their own (:class:`GatedBankUpdate`,
:class:`TaskHeadUpdate`) that save only the codes (or the input), the gates (or task ids) and the bank
parameter itself. Left to autograd, the addmm would save its two operands: the gated codes (T, E*r) and
B_stacked, a copy of the whole bank (permute + reshape cannot be a view), and each bmm/baddbmm its N gathered
heads (B_(task), and lora_moe's A_(task) rows); for every adapted layer, until backward. Backward rebuilds
them instead (an elementwise pass over (T, E*r) and one copy of the bank, against the (T, d_out) matmuls
around them), so task-routed and dense AsymLoRA-MoE save as much as LoRA (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from asymlora.config import TORCH_DTYPES, LayerSpec
from asymlora.errors import AsymLoraError, ConfigError
from asymlora.routing import Routing, RoutingContext, dense_routing, hybrid_routing, task_gates, topk_routing

# Task routing takes the per-sample heads when (E - 1) * tokens per sample reaches this (see "Task routing").
TASK_BMM_MIN_WORK = 64


def _stacked(B_bank: torch.Tensor) -> torch.Tensor:
    """B_bank (E, d_out, r) as B_stacked (d_out, E*r): column block e is B_e."""
    experts, d_out, r = B_bank.shape
    return B_bank.permute(1, 0, 2).reshape(d_out, experts * r)


def _gate_codes(codes: torch.Tensor, gates: torch.Tensor, r: int) -> torch.Tensor:
    """The gated codes (T, E*r): g_e * codes of A_(e) (codes (T, n_A*r); n_A = 1 broadcasts over E)."""
    tokens = codes.shape[0]
    return (gates.unsqueeze(-1) * codes.view(tokens, -1, r)).reshape(tokens, gates.shape[1] * r)


def _add_product(result: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, scaling: float,
                 rhs_dtype: torch.dtype | None = None) -> torch.Tensor:
    """result + s * lhs @ rhs (2-D or batched 3-D factors, ``result`` of the same leading shape): one
    addmm/baddbmm where the dtypes agree, so that neither the scaling nor the residual add is a pass over
    the (tokens, d_out) output; otherwise s scales the small factor and the product is cast to ``result``.
    ``rhs_dtype``: the dtype that decides, when ``rhs`` is a copy already cast to autocast's dtype."""
    if result.dtype == lhs.dtype == (rhs_dtype or rhs.dtype):
        fused = torch.addmm if lhs.dim() == 2 else torch.baddbmm
        return fused(result, lhs, rhs, alpha=scaling)
    product = torch.mm if lhs.dim() == 2 else torch.bmm
    return result + product(lhs * scaling, rhs).to(result.dtype)


def _gated_bank_product(result: torch.Tensor, codes: torch.Tensor, gates: torch.Tensor, stacked: torch.Tensor,
                        scaling: float, bank_dtype: torch.dtype) -> torch.Tensor:
    """result + s * gated(codes, gates) @ B_stacked^T: the forward of :class:`GatedBankUpdate`, and the whole
    product in inference, where ``stacked`` may be a kept copy already in autocast's dtype (``bank_dtype``, the
    bank's own, then still decides fused or not, so both paths do the same arithmetic)."""
    r = stacked.shape[1] // gates.shape[1]
    return _add_product(result, _gate_codes(codes, gates, r), stacked.t(), scaling, bank_dtype)


def _autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives matmuls on ``tensor``'s device now, or None when autocast is off there."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _save_operands(ctx, scaling: float, like: torch.Tensor, fallback: torch.dtype, *tensors: torch.Tensor) -> None:
    """Forward side of the bank Functions: save ``tensors``, the scaling and the dtype the forward's matmuls
    ran in (autocast's on ``like``'s device, else ``fallback``), for :func:`_saved_operands`."""
    ctx.save_for_backward(*tensors)
    ctx.scaling = scaling
    ctx.compute_dtype = _autocast_dtype(like) or fallback


def _saved_operands(ctx, grad_out: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Backward side: the saved tensors, floating ones cast to the forward's matmul dtype (backward runs
    outside autocast), and the output's gradient in that dtype."""
    dtype = ctx.compute_dtype
    saved = [t.to(dtype) if t.is_floating_point() else t for t in ctx.saved_tensors]
    return saved, grad_out.to(dtype)


class GatedBankUpdate(torch.autograd.Function):
    """result + s * gated(codes, gates) @ B_stacked^T for T tokens, saving only codes, gates and B_bank.

    ``result`` (T, d_out) is the base output, ``codes`` (T, n_A*r) the A-codes, ``gates`` (T, E) in the
    codes' dtype, ``B_bank`` (E, d_out, r). Gradients, with G the output's gradient and c = gated codes:
    dresult = G;  dc = s G B_stacked (T, E*r);  dgates_e = <dc_e, codes_(e)>;  dcodes = sum_e g_e dc_e
    (n_A = 1) or g_e dc_e (n_A = E);  dB_stacked = s G^T c. Backward runs its matmuls in the dtype the
    forward's ran in (autocast's, under autocast; backward itself runs outside it), and autograd casts each
    gradient to its input's dtype.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, codes: torch.Tensor, gates: torch.Tensor, B_bank: torch.Tensor,
                scaling: float) -> torch.Tensor:
        _save_operands(ctx, scaling, result, B_bank.dtype, codes, gates, B_bank)
        return _gated_bank_product(result, codes, gates, _stacked(B_bank), scaling, B_bank.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (codes, gates, B_bank), grad = _saved_operands(ctx, grad_out)
        experts, _, r = B_bank.shape
        tokens, s = codes.shape[0], ctx.scaling
        need_result, need_codes, need_gates, need_B, _ = ctx.needs_input_grad
        grad_codes = grad_gates = grad_B = None
        if need_codes or need_gates:
            grad_gated = torch.mm(grad, _stacked(B_bank)).mul_(s).view(tokens, experts, r)
            if need_gates:
                grad_gates = (grad_gated * codes.view(tokens, -1, r)).sum(-1)
            if need_codes:
                weighted = grad_gated * gates.unsqueeze(-1)  # (T, E, r)
                grad_codes = (weighted.sum(1) if codes.shape[1] == r else weighted.reshape(tokens, experts * r))
        if need_B:
            gated = _gate_codes(codes, gates * s, r)
            grad_B = torch.mm(grad.t(), gated).view(-1, experts, r).permute(1, 0, 2)
        return grad_out if need_result else None, grad_codes, grad_gates, grad_B, None


class TaskHeadUpdate(torch.autograd.Function):
    """[result +] s * x @ W_(task)^T per sample, for x (N, L, d) and the bank W (E, d_out, d) gathered at one task
    id per sample (N,), saving only x, the ids and the bank itself (not the N gathered heads). With
    ``result`` (N, L, d_out) the sum is one baddbmm; with None, s must be 1 (lora_moe's per-task A rows).
    Gradients: dx = s G W_(task);  dW_e = s sum over the samples of task e of G^T x, in the forward's matmul
    dtype as in :class:`GatedBankUpdate`."""

    @staticmethod
    def forward(ctx, result: torch.Tensor | None, x: torch.Tensor, task_ids: torch.Tensor, bank: torch.Tensor,
                scaling: float) -> torch.Tensor:
        _save_operands(ctx, scaling, x, bank.dtype, x, task_ids, bank)
        heads = bank[task_ids].transpose(1, 2)
        return torch.bmm(x, heads) if result is None else _add_product(result, x, heads, scaling)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (x, task_ids, bank), grad = _saved_operands(ctx, grad_out)
        need_result, need_x, _, need_bank, _ = ctx.needs_input_grad
        grad_x = grad_bank = None
        s = ctx.scaling

        def scaled(product: torch.Tensor) -> torch.Tensor:  # s on the product, not on x (no pass when s = 1)
            return product if s == 1 else product.mul_(s)

        if need_x:
            grad_x = scaled(torch.bmm(grad, bank[task_ids]))
        if need_bank:
            per_sample = scaled(torch.bmm(grad.transpose(1, 2), x))  # (N, d_out, d)
            grad_bank = torch.zeros_like(bank).index_add_(0, task_ids, per_sample)
        return grad_out if need_result else None, grad_x, None, grad_bank, None


class AsymLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the asymmetric-LoRA update (see the module docstring)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        spec: LayerSpec,
        name: str = "",
        adapter_dtype: str = "float32",
        router_init_std: float = 0.02,
        task_bias_init: float = 0.0,
        b_init_std: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"target_modules: {name!r} is a {type(base_layer).__name__}, not an nn.Linear")
        self.base_layer = base_layer
        self.spec = spec
        self.name = name
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.scaling = spec.scaling
        weight = base_layer.weight
        if adapter_dtype != "auto":
            dtype = TORCH_DTYPES[adapter_dtype]
        elif weight.is_floating_point():
            dtype = weight.dtype
        else:  # a quantized base (bitsandbytes packs 4/8-bit integers): the dtype it computes in
            dtype = getattr(base_layer, "compute_dtype", None) or torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        r, experts = spec.r, spec.num_experts
        self.A_bank = nn.Parameter(torch.empty(spec.num_A * r, self.in_features, **factory))
        self.B_bank = nn.Parameter(torch.zeros(experts, self.out_features, r, **factory))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.router: nn.Linear | None = None
        self.task_bias: nn.Parameter | None = None
        if spec.has_router:
            self.router = nn.Linear(self.in_features, experts, device=weight.device, dtype=torch.float32)
        if spec.has_task_bias:
            self.task_bias = nn.Parameter(torch.zeros(spec.num_tasks, experts, device=weight.device))
        self._router_init_std = router_init_std
        self._task_bias_init = task_bias_init
        self._b_init_std = b_init_std if spec.initialises_B_apart else 0.0
        self.reset_adapter_parameters()
        # Set by asymlora.model.get_model: the per-forward task ids, token mask and loss collector.
        self.routing_context: RoutingContext | None = None
        self.merged_task: int | None = None
        self._base_backup: torch.Tensor | None = None
        # Inference only: B_stacked kept between forwards, with the (storage, version, dtype) it was made from
        # and a weak reference to the bank parameter itself.
        self._stacked_cache: tuple[tuple, weakref.ref, torch.Tensor] | None = None

    def reset_adapter_parameters(self) -> None:
        """A: kaiming-uniform (as nn.Linear / PEFT); B: zeros (or centred noise); router: N(0, std); task bias: prior.

        With ``b_init_std`` > 0 (dense AsymLoRA-MoE), each head starts as N(0, std^2) noise minus the heads'
        mean, rescaled so each head keeps that std: the heads sum to zero, so under uniform gates the update
        is exactly 0, yet each head gets a different router gradient from the first step.
        """
        nn.init.kaiming_uniform_(self.A_bank, a=math.sqrt(5))
        nn.init.zeros_(self.B_bank)
        if self._b_init_std > 0:
            with torch.no_grad():
                experts = self.B_bank.shape[0]
                noise = torch.randn(self.B_bank.shape, dtype=torch.float32, device=self.B_bank.device)
                centred = (noise - noise.mean(dim=0, keepdim=True)) * math.sqrt(experts / (experts - 1))
                self.B_bank.copy_(centred * self._b_init_std)
        if self.router is not None:
            nn.init.normal_(self.router.weight, std=self._router_init_std)
            nn.init.zeros_(self.router.bias)
        if self.task_bias is not None:
            with torch.no_grad():
                self.task_bias.zero_()
                for task in range(self.spec.num_tasks):
                    self.task_bias[task, task % self.spec.num_experts] = self._task_bias_init

    @property
    def weight(self) -> torch.Tensor:  # what code that inspects `module.weight` expects
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        s = self.spec
        return (f"method={s.method}, r={s.r}, E={s.num_experts}, routing={s.routing}, n_A={s.num_A}, "
                f"scaling={self.scaling:g}, merged_task={self.merged_task}")

    # ------------------------------------------------------------------------------------ routing
    def _token_task_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token task ids (T,) from the per-sample ids in the routing context; built once per forward
        and input shape, and shared by the layers (the context keeps them while its task ids stay)."""
        ctx = self.routing_context
        key = (tuple(x.shape[:-1]), x.device)
        cache = getattr(ctx, "token_task_cache", None)
        if cache is not None and cache[0] is ctx.task_ids and key in cache[1]:
            return cache[1][key]
        ids = self._sample_task_ids(x)
        if ids is None:
            return None
        per_sample = math.prod(x.shape[1:-1]) if x.dim() >= 3 else 1
        tokens = ids.unsqueeze(1).expand(ids.shape[0], per_sample).reshape(-1)
        if ctx is not None:
            if cache is None or cache[0] is not ctx.task_ids:
                cache = ctx.token_task_cache = (ctx.task_ids, {})
            cache[1][key] = tokens
        return tokens

    def _sample_task_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """Task ids (N,), one per row of ``x``'s first dimension, from the routing context's per-sample ids."""
        ctx = self.routing_context
        ids = ctx.task_ids if ctx is not None else None
        if ids is None:
            if self.spec.needs_task_ids:
                raise AsymLoraError(
                    f"{self.name}: routing='task' needs task_ids (one per sample) in the forward call"
                )
            return None
        batch = x.shape[0] if x.dim() >= 2 else 1
        if batch != ids.shape[0]:
            if ids.shape[0] and batch % ids.shape[0] == 0:  # e.g. beams expanded by generate()
                ids = ids.repeat_interleave(batch // ids.shape[0])
            else:
                raise AsymLoraError(
                    f"{self.name}: input has batch size {batch} but {ids.shape[0]} task ids were given; "
                    "task-dependent routing is only defined for layers whose inputs are (batch, seq, features)"
                )
        return ids.to(x.device)

    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        ctx = self.routing_context
        mask = ctx.token_mask if ctx is not None else None
        if mask is None or x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
            return None
        return mask.reshape(-1).to(x.device)

    def route(self, x_flat: torch.Tensor, token_task_ids: torch.Tensor | None) -> Routing | None:
        """Gates (T, E) for the flattened tokens; None when there is a single expert and no router."""
        spec = self.spec
        if self.router is None:
            if spec.num_experts == 1:
                return None
            return Routing(gates=task_gates(token_task_ids, spec.num_experts, x_flat.dtype))
        with torch.autocast(device_type=x_flat.device.type, enabled=False):
            logits = self.router(x_flat.to(self.router.weight.dtype))
        if spec.routing == "dense":
            return dense_routing(logits)
        if spec.routing == "topk":
            return topk_routing(logits, spec.top_k)
        return hybrid_routing(logits, self.task_bias, token_task_ids)

    # ------------------------------------------------------------------------------------ forward
    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """What A multiplies: dropout(x) in the adapter's dtype."""
        return self.dropout(x).to(self.A_bank.dtype)

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """A.x (..., n_A*r) of the dropped-out input, computed once for every head."""
        return F.linear(self._adapter_input(x), self.A_bank)

    def _gated_update(self, result: torch.Tensor, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """result + s * sum_e g_e B_e A_(e) dropout(x) for flattened tokens (result (T, d_out), x (T, d_in),
        gates (T, E) or None for a single expert): one A matmul, one matmul over the stacked bank."""
        codes = self._codes(x)  # (T, n_A * r)
        if gates is None:  # a single expert: plain LoRA
            # squeeze, not B_bank[0]: a view whose backward is a view too (select's backward would fill a
            # zero bank and copy the gradient into it, two passes per layer and step)
            return _add_product(result, codes, self.B_bank.squeeze(0).t(), self.scaling)
        gates = gates.to(codes.dtype)
        stacked = self._inference_stacked(codes)
        if stacked is not None:
            return _gated_bank_product(result, codes, gates, stacked, self.scaling, self.B_bank.dtype)
        return GatedBankUpdate.apply(result, codes, gates, self.B_bank, self.scaling)

    def _inference_stacked(self, like: torch.Tensor) -> torch.Tensor | None:
        """B_stacked (d_out, E*r) for an inference forward (eval mode, no gradient), built once and reused while
        the bank is unchanged; None otherwise (training re-stacks: keeping a copy would hold the bank twice).

        Stacking copies the whole bank, which at a decoding step (one token per sample) is as much memory
        traffic as the base weight itself. The copy is keyed by the bank's storage, version counter (every
        in-place update bumps it) and the dtype the product runs in (autocast's, when it is on), and is dropped
        by ``train()``. Not kept under ``torch.compile`` (inductor plans its own copies) or inside an
        initialised process group (FSDP gathers a full bank for each forward and frees it after). A replaced
        parameter (``load_state_dict(assign=True)``) always gets a new copy, even where the allocator gave it the
        old one's address, and ``.to()`` / ``.half()`` / ``.cuda()`` drop the copy (:meth:`_apply`)."""
        bank = self.B_bank
        if self.training or torch.is_grad_enabled() or bank.is_inference() or torch.compiler.is_compiling() \
                or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        dtype = _autocast_dtype(like) or bank.dtype
        key = (bank.data_ptr(), bank._version, dtype, bank.device, tuple(bank.shape))
        kept = self._stacked_cache
        if kept is None or kept[0] != key or kept[1]() is not bank:
            self._stacked_cache = None  # free the stale copy before making the new one
            with torch.inference_mode(False):  # a normal tensor: usable outside inference mode too
                self._stacked_cache = (key, weakref.ref(bank), _stacked(bank.detach()).to(dtype))
        return self._stacked_cache[2]

    def train(self, mode: bool = True) -> AsymLoraLinear:
        if mode:
            self._stacked_cache = None
        return super().train(mode)

    def __getstate__(self) -> dict:  # pickling (torch.save of a whole module, deepcopy) leaves the copy out
        state = super().__getstate__()
        state["_stacked_cache"] = None
        return state

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(), ...: the kept copy is the old bank's
        self._stacked_cache = None
        return super()._apply(fn, recurse)

    def _task_update(self, result: torch.Tensor, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Task routing without multiplying the zero gates, for result (N, L, d_out), x (N, L, d_in) and one
        task id per sample (N,): result + s * B_(task) A_(task) dropout(x) in one batched matmul
        (see "Task routing")."""
        spec = self.spec
        if spec.num_A == 1:
            codes = self._codes(x)  # (N, L, r): the shared A.x
        else:  # lora_moe: each task has its own A rows
            A_heads = self.A_bank.view(spec.num_experts, spec.r, self.in_features)
            codes = TaskHeadUpdate.apply(None, self._adapter_input(x), task_ids, A_heads, 1.0)
        return TaskHeadUpdate.apply(result, codes, task_ids, self.B_bank, self.scaling)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged_task is not None:
            return result
        ctx = self.routing_context
        if ctx is not None and ctx.disabled:
            return result
        spec = self.spec
        if self.router is None and spec.num_experts > 1 and x.dim() >= 2 and \
                (spec.num_experts - 1) * math.prod(x.shape[1:-1]) >= TASK_BMM_MIN_WORK:  # task routing, long samples
            ids = self._sample_task_ids(x)  # raises if the forward was given none
            out = self._task_update(result.reshape(ids.shape[0], -1, self.out_features),
                                    x.reshape(ids.shape[0], -1, self.in_features), ids)
            return out.view(result.shape)
        x_flat = x.reshape(-1, self.in_features)
        needs_ids = spec.needs_task_ids or spec.has_task_bias
        collecting = ctx is not None and ctx.collecting and self.router is not None
        token_task_ids = self._token_task_ids(x) if needs_ids or (collecting and ctx.collect_stats) else None
        routing = self.route(x_flat, token_task_ids)
        if collecting:
            self._record(routing, self._token_mask(x), token_task_ids)
        out = self._gated_update(result.reshape(-1, self.out_features), x_flat,
                                 None if routing is None else routing.gates)
        return out.view(result.shape)

    def _record(self, routing: Routing, token_mask: torch.Tensor | None, token_task_ids: torch.Tensor | None) -> None:
        """Hand this forward's router tensors (with their graph) to the context for the balance loss
        (dispatch None for dense and hybrid routing: the model takes the argmax of all layers at once)."""
        self.routing_context.records.append((self.name, (routing.probs, routing.dispatch, token_mask, token_task_ids)))

    # ------------------------------------------------------------------------------------ merging
    def delta_weight(self, task: int | None = None) -> torch.Tensor:
        """s * B_t A_(t) as a (d_out, d_in) matrix, for a layer whose gate is fixed given the task."""
        spec = self.spec
        if spec.input_dependent:
            raise NotImplementedError(
                f"{self.name}: routing={spec.routing!r} mixes the B heads with gates that depend on each "
                "token's hidden state (the router), so no single weight matrix reproduces it; merge/export "
                "is defined for lora and for task routing"
            )
        expert = 0
        if spec.num_experts > 1:
            if task is None:
                raise ConfigError(f"task: {self.name} has {spec.num_experts} task experts; name the task to merge")
            if not 0 <= task < spec.num_experts:
                raise ConfigError(f"task: id {task} out of range [0, {spec.num_experts}) for {self.name}")
            expert = task
        r = spec.r
        A = self.A_bank[expert * r:(expert + 1) * r] if spec.num_A > 1 else self.A_bank
        return (self.B_bank[expert].float() @ A.float()) * self.scaling

    @torch.no_grad()
    def merge(self, task: int | None = None) -> None:
        """Fold s * B_t A into the base weight (keeping an exact copy of the base for unmerge)."""
        if self.merged_task is not None:
            raise AsymLoraError(f"{self.name}: already merged (task {self.merged_task}); unmerge first")
        delta = self.delta_weight(task)
        weight = self.base_layer.weight
        merged = weight.float() + delta.to(weight.device)
        if not torch.isfinite(merged).all():
            raise AsymLoraError(f"{self.name}: merged weight has NaN/inf values; the base weight was left unchanged")
        self._base_backup = weight.detach().to("cpu", copy=True)
        weight.copy_(merged.to(weight.dtype))
        self.merged_task = task if task is not None else 0

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by :meth:`merge`."""
        if self.merged_task is None:
            return
        self.base_layer.weight.copy_(self._base_backup.to(self.base_layer.weight.device))
        self._base_backup = None
        self.merged_task = None
