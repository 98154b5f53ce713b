"""The fused layer against a plain per-expert loop that implements the "Semantics" block literally."""

import copy
import pickle

import pytest
import torch
from tiny_models import case_id
from torch import nn

from asymlora import AsymLoraConfig, AsymLoraLinear
from asymlora.routing import RoutingContext

TASKS = ["a", "b", "c"]
CASES = [
    dict(method="lora"),
    dict(method="asymlora", tasks=TASKS),
    dict(method="asymlora_moe", num_experts=4, routing="dense", tasks=TASKS),
    dict(method="asymlora_moe", num_experts=4, routing="topk", top_k=2, tasks=TASKS),
    dict(method="asymlora_moe", num_experts=4, routing="hybrid", tasks=TASKS),
    dict(method="lora_moe", num_experts=3, routing="dense", tasks=TASKS),
    dict(method="lora_moe", num_experts=3, routing="topk", top_k=1, tasks=TASKS),
    dict(method="lora_moe", num_experts=3, routing="hybrid", tasks=TASKS),
    dict(method="lora_moe", routing="task", tasks=TASKS),
]


def make_layer(dtype=torch.float64, d_in=12, d_out=10, **kwargs):
    torch.manual_seed(0)
    config = AsymLoraConfig(r=3, alpha=5.0, **kwargs)
    layer = AsymLoraLinear(nn.Linear(d_in, d_out), config.layer_spec(), name="layer", task_bias_init=0.7)
    layer = layer.to(dtype)
    with torch.no_grad():  # B is zero-initialised: make every term visible
        layer.B_bank.normal_()
        if layer.task_bias is not None:
            layer.task_bias.normal_()
        if layer.router is not None:
            layer.router.weight.normal_()
    ctx = RoutingContext()
    layer.routing_context = ctx
    return layer, ctx


def loop_reference(layer, x, task_ids):
    """y = W x + s * sum_e g_e(x) B_e A_(e) x, one expert and one token at a time."""
    spec = layer.spec
    r = spec.r
    out = torch.empty(x.shape[0], x.shape[1], layer.out_features, dtype=x.dtype)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xt = x[b, t]
            task = int(task_ids[b]) if task_ids is not None else -1
            if spec.has_router:
                logits = layer.router.weight @ xt + layer.router.bias
                if spec.routing == "hybrid" and task >= 0:
                    logits = logits + layer.task_bias[task]
                p = torch.softmax(logits, -1)
                if spec.routing == "topk":
                    keep = torch.topk(p, spec.top_k).indices
                    g = torch.zeros_like(p)
                    g[keep] = p[keep] / p[keep].sum() if spec.top_k > 1 else p[keep]  # Switch top-1
                else:
                    g = p
            elif spec.num_experts == 1:
                g = torch.ones(1, dtype=x.dtype)
            else:
                g = torch.zeros(spec.num_experts, dtype=x.dtype)
                g[task] = 1.0
            y = layer.base_layer.weight @ xt + layer.base_layer.bias
            for e in range(spec.num_experts):
                A = layer.A_bank[e * r:(e + 1) * r] if spec.num_A > 1 else layer.A_bank
                y = y + layer.scaling * g[e] * (layer.B_bank[e] @ (A @ xt))
            out[b, t] = y
    return out


EACH_CASE = pytest.mark.parametrize("case", CASES, ids=case_id)


def gradient_task_ids(case: dict) -> torch.Tensor:
    """Task ids of the three samples of the gradient tests: two tasks (one twice); hybrid's -1 is the router alone."""
    return torch.tensor([2, -1, 1]) if case.get("routing") == "hybrid" else torch.tensor([1, 2, 1])


# 5 tokens per sample: task routing takes the gated product; 60: the per-sample heads (TASK_BMM_MIN_WORK)
SEQ_LENGTHS = [5, 60]


@pytest.mark.parametrize("seq", SEQ_LENGTHS)
@EACH_CASE
def test_fused_matches_loop_float64(case, seq):
    layer, ctx = make_layer(**case)
    torch.manual_seed(1)
    x = torch.randn(3, seq, 12, dtype=torch.float64)
    ctx.task_ids = torch.tensor([2, 0, 1])
    if case.get("routing") == "hybrid":
        ctx.task_ids = torch.tensor([2, -1, 1])  # -1: the router alone
    fused = layer(x)
    expected = loop_reference(layer, x, ctx.task_ids)
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seq", SEQ_LENGTHS)
@EACH_CASE
def test_fused_gradients_match_loop_float64(case, seq):
    """The fused path (and the per-sample head gather of task routing) backpropagates as the loop does."""
    layer, ctx = make_layer(**case)
    torch.manual_seed(2)
    x = torch.randn(3, seq, 12, dtype=torch.float64, requires_grad=True)
    ctx.task_ids = gradient_task_ids(case)
    weights = torch.randn(3, seq, layer.out_features, dtype=torch.float64)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    fused = torch.autograd.grad((layer(x) * weights).sum(), params)
    expected = torch.autograd.grad((loop_reference(layer, x, ctx.task_ids) * weights).sum(), params)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seq", SEQ_LENGTHS)
@EACH_CASE
def test_bfloat16_base_with_float32_adapter_backpropagates_as_the_loop(case, seq):
    """A bf16 base output with a float32 adapter (result and factors of different dtypes): the bank products
    cast the product, and their backward hands the base path bf16 gradients and the adapter float32 ones."""
    layer, ctx = make_layer(dtype=torch.float32, **case)
    layer.base_layer.to(torch.bfloat16)
    torch.manual_seed(3)
    x = torch.randn(3, seq, 12, dtype=torch.bfloat16, requires_grad=True)
    ctx.task_ids = gradient_task_ids(case)
    weights = torch.randn(3, seq, layer.out_features)
    adapter = [p for name, p in layer.named_parameters() if not name.startswith("base_layer")]
    out = layer(x)
    assert out.dtype == torch.bfloat16
    fused = torch.autograd.grad((out.float() * weights).sum(), [x] + adapter)
    loop_x = x.detach().float().requires_grad_()
    layer.base_layer.float()
    expected = torch.autograd.grad((loop_reference(layer, loop_x, ctx.task_ids) * weights).sum(), [loop_x] + adapter)
    assert fused[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in fused[1:])
    for got, want in zip(fused, expected):  # bf16 rounding of the base weight, input and output
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())


@pytest.mark.parametrize("seq", SEQ_LENGTHS)
@EACH_CASE
def test_float32_layer_under_bfloat16_autocast_backpropagates_as_the_loop(case, seq):
    """Under autocast (the Trainer's bf16 on a float32 model) the matmuls run in bf16 and backward runs
    outside autocast: the bank products' backward must still pair bf16 codes with float32 parameters."""
    layer, ctx = make_layer(dtype=torch.float32, **case)
    torch.manual_seed(4)
    x = torch.randn(3, seq, 12, requires_grad=True)
    ctx.task_ids = gradient_task_ids(case)
    weights = torch.randn(3, seq, layer.out_features)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    fused = torch.autograd.grad((out.float() * weights).sum(), params)
    expected = torch.autograd.grad((loop_reference(layer, x, ctx.task_ids) * weights).sum(), params)
    assert all(got.dtype == want.dtype == torch.float32 for got, want in zip(fused, expected))
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


@pytest.mark.parametrize("seq", SEQ_LENGTHS)
@EACH_CASE
def test_backward_keeps_no_copy_of_the_bank(case, seq):
    """What one forward saves for backward beyond LoRA's (the input and its A-codes) is only the gates and
    the router's (T, E)-sized tensors: less than either the gated codes (T, E*r) or one copy of the bank
    (the stacked B, or the gathered heads), which autograd would keep for every layer until backward."""
    r, d_in, d_out, samples = 16, 64, 256, 3
    config = AsymLoraConfig(r=r, alpha=32.0, **case)
    layer = AsymLoraLinear(nn.Linear(d_in, d_out), config.layer_spec(), name="layer")
    layer.base_layer.requires_grad_(False)
    layer.routing_context = RoutingContext()
    layer.routing_context.task_ids = torch.tensor([2, 0, 1])
    x = torch.randn(samples, seq, d_in, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    spec, tokens = layer.spec, samples * seq
    extra = sum(saved.values()) - tokens * (d_in + spec.num_A * r) * 4  # codes: (T, r) on the per-sample path
    if spec.num_experts == 1:
        assert extra == 0
    else:
        gated_codes = tokens * spec.num_experts * r * 4
        bank_copy = min(spec.num_experts, samples) * d_out * r * 4
        assert extra < min(gated_codes, bank_copy)


@pytest.mark.parametrize(("method", "seq", "per_sample"), [
    ("asymlora", 1, False), ("asymlora", 31, False), ("asymlora", 32, True), ("lora_moe", 32, True)])
def test_task_routing_takes_the_per_sample_heads_only_for_long_samples(monkeypatch, method, seq, per_sample):
    """(E - 1) * tokens per sample >= TASK_BMM_MIN_WORK (64; E = 3 here) picks the gathered heads; a
    decoding step (one token per sample) takes the gated product, whose cost does not grow with the batch."""
    layer, ctx = make_layer(method=method, tasks=TASKS, **({"routing": "task"} if method == "lora_moe" else {}))
    calls = []
    original = AsymLoraLinear._task_update
    monkeypatch.setattr(AsymLoraLinear, "_task_update", lambda self, *a: calls.append(1) or original(self, *a))
    ctx.task_ids = torch.tensor([2, 0])
    x = torch.randn(2, seq, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), loop_reference(layer, x, ctx.task_ids), rtol=1e-12, atol=1e-12)
    assert bool(calls) is per_sample


def test_task_routing_expands_ids_over_beams_and_rows():
    """generate() repeats each sample for its beams; a 2-D input has one sample per row."""
    layer, ctx = make_layer(method="asymlora", tasks=TASKS)
    ctx.task_ids = torch.tensor([2, 0])
    x = torch.randn(4, 3, 12, dtype=torch.float64)  # 2 samples x 2 beams
    torch.testing.assert_close(layer(x), loop_reference(layer, x, torch.tensor([2, 2, 0, 0])), rtol=1e-12, atol=1e-12)
    rows = torch.randn(2, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(rows), loop_reference(layer, rows[:, None], ctx.task_ids)[:, 0],
                               rtol=1e-12, atol=1e-12)


@EACH_CASE
def test_inference_reuses_one_stacked_bank_until_the_bank_changes(case):
    """In eval mode without gradients the stacked bank is built once and reused (a decoding step would
    otherwise copy the whole bank per token); its output is the training path's, bit for bit, and any
    in-place change of the bank (an optimizer step, load_state_dict) makes a new copy. train() drops it."""
    layer, ctx = make_layer(dtype=torch.float32, **case)
    ctx.task_ids = torch.tensor([2, 0])
    x = torch.randn(2, 1, 12)  # one token per sample: task routing takes the gated product too
    layer.eval()
    reference = layer(x).detach()  # gradients on: the autograd Function, no copy kept
    assert layer._stacked_cache is None
    with torch.inference_mode():
        first = layer(x)
    kept = layer._stacked_cache
    if layer.spec.num_experts == 1:  # LoRA multiplies B_0 itself: nothing to stack
        assert kept is None and torch.equal(first, reference)
        return
    assert kept is not None and torch.equal(first, reference)
    with torch.no_grad():  # outside inference mode the copy made inside it is still usable
        assert torch.equal(layer(x), reference) and layer._stacked_cache[2] is kept[2]
        layer.B_bank.mul_(2.0)
        changed = layer(x)
    assert layer._stacked_cache[2] is not kept[2]
    expected = layer(x).detach()
    assert torch.equal(changed, expected) and not torch.equal(changed, reference)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["B_bank"].add_(1.0)
    layer.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.clone().requires_grad_()).detach())
    assert "_stacked_cache" not in str(list(layer.state_dict()))
    layer.train()
    assert layer._stacked_cache is None


def test_inference_copy_is_dropped_by_to_and_remade_for_a_replaced_bank():
    """.to() / .half() free the kept copy at once (it is the old bank's, on the old device or dtype), and a
    bank parameter replaced by another object gets a copy of its own, whatever its storage address."""
    layer, ctx = make_layer(dtype=torch.float32, method="asymlora_moe", num_experts=4, routing="dense", tasks=TASKS)
    ctx.task_ids = torch.tensor([2, 0])
    with torch.no_grad():
        layer.B_bank.normal_()
    x = torch.randn(2, 1, 12)
    layer.eval()
    with torch.no_grad():
        layer(x)
        assert layer._stacked_cache is not None
        layer.to(torch.float64)
        assert layer._stacked_cache is None
        got = layer(x.double())
        assert layer._stacked_cache[2].dtype == torch.float64
        layer.float()
        assert layer._stacked_cache is None
        layer(x)
        old, old_bank = layer._stacked_cache, layer.B_bank
        # the same storage and version under a new parameter object: only its identity tells them apart
        layer.B_bank = nn.Parameter(old_bank.detach())
        assert layer.B_bank.data_ptr() == old_bank.data_ptr() and layer.B_bank._version == old_bank._version
        layer(x)
        assert layer._stacked_cache[2] is not old[2] and layer._stacked_cache[1]() is layer.B_bank
    copied = pickle.loads(pickle.dumps(layer))  # a weak reference cannot be pickled: the copy stays behind
    assert copied._stacked_cache is None and copy.deepcopy(layer)._stacked_cache is None
    assert torch.equal(got, layer.double()(x.double().requires_grad_()).detach())


@pytest.mark.parametrize("seq", SEQ_LENGTHS)
def test_inference_cache_follows_autocast(seq):
    """Under autocast the kept copy is in the autocast dtype, so no cast of the bank is left per call."""
    layer, ctx = make_layer(dtype=torch.float32, method="asymlora_moe", num_experts=4, routing="dense", tasks=TASKS)
    ctx.task_ids = torch.tensor([2, 0])
    x = torch.randn(2, seq, 12)
    layer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = layer(x).detach()
        with torch.no_grad():
            got = layer(x)
    assert layer._stacked_cache[2].dtype == torch.bfloat16 and torch.equal(got, reference)
    with torch.no_grad():
        layer(x)
    assert layer._stacked_cache[2].dtype == torch.float32


@EACH_CASE
def test_zero_initialised_B_is_identity(case):
    config = AsymLoraConfig(r=4, **case)
    base = nn.Linear(8, 6)
    layer = AsymLoraLinear(base, config.layer_spec(), name="l")
    layer.routing_context = RoutingContext()
    layer.routing_context.task_ids = torch.tensor([0, 1])
    x = torch.randn(2, 3, 8)
    assert torch.equal(layer(x), base(x))


def test_centred_B_init_is_identity_with_heads_apart():
    """b_init_std: the heads start apart and cancel under the uniform gates of a zero router."""
    torch.manual_seed(0)
    config = AsymLoraConfig(r=4, method="asymlora_moe", num_experts=4, b_init_std=0.05, router_init_std=0.0,
                            overrides={"attn": {"method": "lora", "num_experts": 1}})
    base = nn.Linear(32, 48)
    layer = AsymLoraLinear(base, config.spec_for("mlp"), name="mlp", b_init_std=config.b_init_std,
                           router_init_std=config.router_init_std)
    layer.routing_context = RoutingContext()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    heads = layer.B_bank.detach().flatten(1)
    torch.testing.assert_close(heads.sum(0), torch.zeros_like(heads[0]), rtol=0, atol=1e-6)
    assert heads.std(dim=1).sub(0.05).abs().max() < 0.005  # each head keeps the std asked for
    cosine = torch.nn.functional.cosine_similarity(heads[:, None], heads[None], dim=-1)
    assert cosine[~torch.eye(4, dtype=torch.bool)].max() < 0  # centred: every pair points apart
    layer(x).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0  # the router can tell the heads apart from step 1
    other = AsymLoraLinear(nn.Linear(32, 48), config.spec_for("attn"), name="attn", b_init_std=config.b_init_std)
    assert not other.B_bank.any()  # lora layers keep the zero init


@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_router_gets_gradient_from_output(top_k):
    layer, ctx = make_layer(dtype=torch.float32, method="asymlora_moe", num_experts=4, routing="topk", top_k=top_k)
    x = torch.randn(2, 7, 12)
    layer(x).pow(2).sum().backward()  # the output alone: no balance loss here
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_router_stays_float32_and_adapter_dtype_follows_config():
    config = AsymLoraConfig(method="asymlora_moe", num_experts=2, r=2)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = AsymLoraLinear(base, config.layer_spec(), name="l", adapter_dtype="float32")
    layer.routing_context = RoutingContext()
    assert layer.router.weight.dtype == torch.float32 and layer.A_bank.dtype == torch.float32
    out = layer(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    auto = AsymLoraLinear(base, config.layer_spec(), name="l", adapter_dtype="auto")
    assert auto.A_bank.dtype == torch.bfloat16


def test_merge_unmerge_exact_and_refuses_router():
    layer, ctx = make_layer(dtype=torch.float32, method="asymlora", tasks=TASKS)
    before = layer.base_layer.weight.detach().clone()
    x = torch.randn(1, 4, 12)
    ctx.task_ids = torch.tensor([1])
    expected = layer(x)
    layer.merge(task=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)
    moe, _ = make_layer(dtype=torch.float32, method="asymlora_moe", num_experts=2)
    with pytest.raises(NotImplementedError, match="depend on each token"):
        moe.merge(task=0)


def test_merge_refuses_non_finite():
    layer, _ = make_layer(dtype=torch.float32, method="lora")
    with torch.no_grad():
        layer.B_bank[0, 0, 0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(Exception, match="NaN/inf"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_task is None
