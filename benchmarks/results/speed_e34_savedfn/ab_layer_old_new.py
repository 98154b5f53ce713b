"""Layer-level A/B of the adapter layer before (commit 7491d32) and after its bank products became autograd
Functions: forward + backward of one 576 -> 1536 layer, 2 x 128 tokens, r=16, alternating order, 40 rounds
(the first 5 dropped). Run from the repository root: python benchmarks/results/speed_e34_savedfn/ab_layer_old_new.py"""

import importlib.util
import statistics
import subprocess
import tempfile
import time

import torch
from torch import nn

from asymlora import AsymLoraConfig
from asymlora.layer import AsymLoraLinear as New
from asymlora.routing import RoutingContext

with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
    handle.write(subprocess.run(["git", "show", "7491d32:src/asymlora/layer.py"], capture_output=True, text=True,
                                check=True).stdout)
spec = importlib.util.spec_from_file_location("asymlora.oldlayer", handle.name)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)

torch.manual_seed(0)
for method, kw in [("asymlora", dict(tasks=["a", "b", "c"])), ("asymlora_moe", dict(num_experts=3, routing="dense")),
                   ("asymlora_moe", dict(num_experts=8, routing="dense"))]:
    cfg = AsymLoraConfig(r=16, alpha=32, method=method, **kw)
    base = nn.Linear(576, 1536).requires_grad_(False)
    layers = []
    for cls in (old.AsymLoraLinear, New):
        layer = cls(base, cfg.layer_spec(), name="l")
        layer.routing_context = RoutingContext()
        layer.routing_context.task_ids = torch.tensor([0, 1])
        layers.append(layer)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 128, 576, requires_grad=True)
    ratios = []
    for rep in range(40):
        order = layers if rep % 2 else layers[::-1]
        times = []
        for layer in order:
            start = time.perf_counter()
            layer(x).sum().backward()
            times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0] if rep % 2 else times[0] / times[1])  # new / old
    q1, median, q3 = statistics.quantiles(ratios[5:], n=4)
    print(f"{method} {kw.get('routing', 'task')} E={cfg.layer_spec().num_experts}: new/old {median:.3f} "
          f"(IQR {q1:.3f}-{q3:.3f})")
