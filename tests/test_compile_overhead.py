"""The compiled step's fixed cost per step (nbs/00_core.ipynb, "What the compiled step costs over torch's fused Adam"):
a group's parameters share one 0-d step count, repeated scalar arithmetic is merged into one node, and the path where
counts differ (a parameter that missed steps) still agrees with the eager step."""
from __future__ import annotations
import re

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from optim_lab.core import _merge_repeated_scalars
from optim_lab.optimizers.adam import Adam

SHAPES = [(8, 4), (4,), (16, 4), (8, 4)]


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def scalar_buffers(opt) -> int:
    "0-d buffers the compiled step's wrapper allocates every step"
    _, sources = run_and_get_code(opt.step)
    return sources[-1].count('empty_strided_cpu((), ()')


def test_scalar_buffers_do_not_grow_with_the_group():
    "6 per tensor before the merge (Adam's bias corrections and lerp weight): now a few for the whole group"
    torch._dynamo.reset()
    ps = params()
    for p in ps: p.grad = torch.ones_like(p)
    small = scalar_buffers(Adam(ps[:2], compile=True))
    torch._dynamo.reset()
    large = scalar_buffers(Adam(ps, compile=True))
    assert large == small, (small, large)


def test_merge_keeps_constants_apart():
    "mul(x, 0.0) and mul(x, -0.0) differ (the sign of a zero), as do add(x, 1) and add(x, 1.0) on an integer x"
    def f(x, k):
        return (x * 0.0, x * -0.0, x * 0.0, k + 1, k + 1.0)
    gm = make_fx(f)(torch.tensor(2.0), torch.tensor(3))
    before = [n for n in gm.graph.nodes if n.op == 'call_function']
    _merge_repeated_scalars(gm.graph)
    gm.recompile()
    after = [n for n in gm.graph.nodes if n.op == 'call_function']
    assert len(after) == len(before) - 1, [n.format_node() for n in after]   # only the repeated x * 0.0
    out = gm(torch.tensor(-2.0), torch.tensor(3))
    assert torch.signbit(out[0]) and not torch.signbit(out[1]) and torch.signbit(out[2])
    assert out[3].dtype == torch.int64 and out[4].dtype == torch.float32


def run(compile, steps=8):
    "Adam with a schedule; parameter 1 has no gradient at step 2, so counts differ from then on"
    ps = params()
    opt = Adam(ps, lr=1e-2, compile=compile)
    for t in range(steps):
        opt.param_groups[0]['lr'] = 1e-2 / (1 + t)
        for i, p in enumerate(ps): p.grad = None if (t == 2 and i == 1) else torch.sin(3 * p.detach() + t)
        opt.step()
    return [p.detach() for p in ps], [opt.state[p]['step'] for p in ps]


def test_missed_steps_agree_with_eager():
    torch._dynamo.reset()
    counters.clear()
    eager, eager_counts = run(False)
    compiled, counts = run(True)
    assert counts == eager_counts == [8, 7, 8, 8]
    for x, y in zip(eager, compiled): torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # the shared count, the group without parameter 1, and counts per parameter: three graphs, however many steps
    assert counters['stats']['unique_graphs'] == 3, dict(counters['stats'])
