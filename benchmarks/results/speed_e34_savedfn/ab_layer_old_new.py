import sys, time, statistics, importlib.util, torch
from torch import nn
sys.path.insert(0, "/tmp/dev")
spec = importlib.util.spec_from_file_location("asymlora.oldlayer", "/tmp/dev/oldlayer.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
from asymlora import AsymLoraConfig
from asymlora.layer import AsymLoraLinear as New
from asymlora.model import RoutingContext
torch.manual_seed(0)
for method, kw in [("asymlora", dict(tasks=["a","b","c"])), ("asymlora_moe", dict(num_experts=3, routing="dense")), ("asymlora_moe", dict(num_experts=8, routing="dense"))]:
    cfg = AsymLoraConfig(r=16, alpha=32, method=method, **kw)
    base = nn.Linear(576, 1536).requires_grad_(False)
    layers = []
    for cls in (old.AsymLoraLinear, New):
        l = cls(base, cfg.layer_spec(), name="l"); ctx = RoutingContext(); ctx.task_ids = torch.tensor([0, 1]); l.routing_context = ctx
        layers.append(l)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 128, 576, requires_grad=True)
    ratios = []
    for rep in range(40):
        t = []
        for l in (layers if rep % 2 else layers[::-1]):
            s = time.perf_counter(); l(x).sum().backward(); t.append(time.perf_counter() - s)
        ratios.append(t[1] / t[0] if rep % 2 else t[0] / t[1])
    q = statistics.quantiles(ratios[5:], n=4)
    print(method, kw.get("routing", "task"), "new/old median %.3f IQR %.3f-%.3f" % (q[1], q[0], q[2]))
