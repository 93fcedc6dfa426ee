"""EMA clipping, growth clipping, averaging and matrix momentum (`optim_lab.modular.clipping_averaging`, chapter 66):
every module against torchzero 0.4.4 along a whole float64 trajectory (a spiky gradient stream, so the clips act), the
cases where torchzero departs from its own documentation against a transcription instead, the README quick start with
`import optim_lab.modular as tz`, and the argument checks."""
from __future__ import annotations
import copy
import math
import os
import warnings

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch
from torch import Tensor

import optim_lab.modular as olm
from optim_lab.modular import Modular, m
from distributed_harness import is_rank, rank_results, serve_rank, shard_rows

WORKER = is_rank(__name__)   # a rank of the sharded test below: no torchzero needed
if not WORKER:
    tz = pytest.importorskip('torchzero')
    warnings.filterwarnings('ignore', module='torchzero')

SHAPES = ((5,), (4, 3), (2, 3, 2))
STEPS = 40


def spike(t: int) -> float:
    "The gradient stream's scale at step t: 1, with a 30x spike every 7th step and a slow swell"
    return (30.0 if t % 7 == 3 else 1.0) * (1 + 0.5 * math.sin(t / 5))


def loss_at(ps: list[Tensor], t: int) -> Tensor:
    return spike(t) * sum(((p - 0.3) ** 2 * (i + 1)).sum() + 0.1 * (p ** 4).sum() for i, p in enumerate(ps))


def trajectory(lib, spec, steps=STEPS, closure=False, seed=0) -> list[list[Tensor]]:
    "Parameters after every step of the chain `spec` [(name, kwargs)] built from `lib.m`, float64"
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]
    opt = (olm.Modular if lib is olm else tz.Optimizer)(ps, *[getattr(lib.m, n)(**kw) for n, kw in spec])
    out = []
    for t in range(steps):
        if closure:
            def c(backward=True, t=t):
                loss = loss_at(ps, t)
                if backward: opt.zero_grad(); loss.backward()
                return loss
            opt.step(c)
        else:
            opt.zero_grad(); loss_at(ps, t).backward(); opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def max_dev(a, b) -> float:
    return max((x - y).abs().max().item() for sa, sb in zip(a, b) for x, y in zip(sa, sb))


def moved(a) -> float:
    "How far the trajectory went from its start: a test whose modules did nothing would pass trivially otherwise"
    return max((x - y).abs().max().item() for x, y in zip(a[0], a[-1]))


LR_ = ('LR', dict(lr=1e-2))
CASES = {
    'ClipNormByEMA': [('ClipNormByEMA', {}), LR_],
    'ClipNormByEMA-global': [('ClipNormByEMA', dict(tensorwise=False, beta=0.9)), LR_],
    'ClipNormByEMA-nogrowth-init': [('ClipNormByEMA', dict(max_ema_growth=None, init=0.1, ord=1)), LR_],
    'ClipNormByEMA-inf': [('ClipNormByEMA', dict(ord=math.inf, beta=0.8, max_ema_growth=1.2)), LR_],
    'NormalizeByEMA': [('NormalizeByEMA', {}), LR_],
    'NormalizeByEMA-global': [('NormalizeByEMA', dict(tensorwise=False, max_ema_growth=1.1)), LR_],
    # eps=0: torchzero's Adam adds ε to √v before debiasing, torch's (chapter 11, m.Adam) after: 1e-8 apart in the step
    'NormalizeByEMA-after-Adam': [('Adam', dict(eps=0.0)), ('NormalizeByEMA', dict(max_ema_growth=1.1)), LR_],
    'ClipValueByEMA': [('ClipValueByEMA', {}), LR_],
    'ClipValueByEMA-init': [('ClipValueByEMA', dict(beta=0.9, init=0.5)), LR_],
    'ClipNormGrowth': [('ClipNormGrowth', {}), LR_],
    'ClipNormGrowth-add-global': [('ClipNormGrowth', dict(add=0.5, mul=None, tensorwise=False)), LR_],
    'ClipNormGrowth-both-nodecay': [('ClipNormGrowth', dict(add=2.0, mul=1.2, max_decay=None, ord=1)), LR_],
    'ClipValueGrowth': [('ClipValueGrowth', {}), LR_],
    'ClipValueGrowth-add': [('ClipValueGrowth', dict(add=0.3, mul=None)), LR_],
    'ClipValueGrowth-both-nodecay': [('ClipValueGrowth', dict(add=1.0, mul=1.3, max_decay=None)), LR_],
    'Averaging': [('Averaging', dict(history_size=4)), LR_],
    'Averaging-1': [('Averaging', dict(history_size=1)), LR_],
    'WeightedAveraging': [('WeightedAveraging', dict(weights=[0.2, 0.0, 1.0, 2.0])), LR_],
    'MedianAveraging-odd': [('MedianAveraging', dict(history_size=5)), LR_],
    'MedianAveraging-even': [('MedianAveraging', dict(history_size=4)), LR_],
    'ScaleByGradCosineSimilarity': [('HeavyBall', dict(momentum=0.9)), ('ScaleByGradCosineSimilarity', {}), LR_],
}


@pytest.mark.parametrize('name', list(CASES))
def test_against_torchzero(name):
    ours, theirs = trajectory(olm, CASES[name]), trajectory(tz, CASES[name])
    assert moved(ours) > 1e-2
    assert max_dev(ours, theirs) <= 1e-9, name


def closure_for(opt, ps, t):
    "A closure on the steady loss (t is ignored: matrix momentum's curvature estimate assumes a fixed objective)"
    def c(backward=True):
        loss = loss_at(ps, 0)
        if backward: opt.zero_grad(); loss.backward()
        return loss
    return c


@pytest.mark.parametrize('kw', [dict(), dict(adaptive=True), dict(mu=0.02, lr=0.005)])
def test_matrix_momentum_against_torchzero(kw):
    """torchzero 0.4.4's step counter starts at 0, so its 'small first step' lands on step 2 (step 1 is a plain η·g step,
    and adaptive μ's first y is g₂ − 0). From step 3 on both run the same recursion: start ours from torchzero's θ₁, θ₂
    (and g(θ₁)) and compare the rest of the trajectory"""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    kw = dict(dict(lr=1e-2), **kw)
    tp = [x.clone().requires_grad_() for x in start]
    theirs = tz.Optimizer(tp, tz.m.MatrixMomentum(**kw))
    seen = []
    for t in range(STEPS):
        theirs.step(closure_for(theirs, tp, t)); seen.append([p.detach().clone() for p in tp])
    op = [x.clone().requires_grad_() for x in seen[1]]                           # θ₂
    ours = Modular(op, m.MatrixMomentum(**kw))
    mod = ours.modules[0]
    mod.global_state['step'] = 1
    th1 = [x.clone().requires_grad_() for x in seen[0]]
    g1 = torch.autograd.grad(loss_at(th1, 0), th1)                               # g(θ₁) as torchzero saw it at step 2
    for p, x, gr in zip(op, seen[0], g1):
        mod.state(p)['p_prev'] = x.clone()
        if kw.get('adaptive'): mod.state(p)['g_prev'] = gr.clone()
    mine = []
    for t in range(2, STEPS):
        ours.step(closure_for(ours, op, t)); mine.append([p.detach().clone() for p in op])
    assert moved(mine) > 1e-2
    assert max_dev(mine, seen[2:]) <= 1e-9


def test_matrix_momentum_is_the_textbook_recursion():
    "θ_{t+1} = θ_t − η g_t + (I − μ H_t)(θ_t − θ_{t−1}) on a quadratic (H constant), after the scaled first step"
    torch.manual_seed(0)
    Q = torch.randn(6, 6, dtype=torch.float64); A = Q @ Q.T / 6 + 0.2 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = Modular([x], m.MatrixMomentum(lr=0.1, mu=0.3))
    def closure(backward=True):
        loss = 0.5 * x @ A @ x - b @ x
        if backward: opt.zero_grad(); loss.backward()
        return loss
    g0 = A @ torch.zeros(6, dtype=torch.float64) - b
    step0 = 0.1 * g0
    scale = min(1.0, max(1 / step0.abs().sum().item(), 1e-7 / step0.abs().max().item()))
    ref = [torch.zeros(6, dtype=torch.float64), -scale * step0]
    for _ in range(30):
        xt, xp = ref[-1], ref[-2]
        ref.append(xt - 0.1 * (A @ xt - b) + (xt - xp) - 0.3 * A @ (xt - xp))
    got = []
    for _ in range(31):
        opt.step(closure); got.append(x.detach().clone())
    for t, (a, r) in enumerate(zip(got, ref[1:])): torch.testing.assert_close(a, r, rtol=0, atol=1e-10, msg=f'step {t}')
    x_star = torch.linalg.solve(A, b)
    assert (got[-1] - x_star).norm() < 0.5 * x_star.norm()


def test_clip_norm_growth_min_value_is_a_floor_not_a_divisor():
    "torchzero 0.4.4 divides every step by min_value when min_value > 1; the docstring's bound max(ρ, min_value)·mul is kept here"
    stream = [torch.ones(4, dtype=torch.float64) for _ in range(6)]   # constant norm 2: no growth, nothing to clip
    def run(mod):
        opt_p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        opt = (Modular if isinstance(mod, olm.Module) else tz.Optimizer)([opt_p], mod)
        out = []
        for g in stream:
            opt_p.grad = g.clone(); before = opt_p.detach().clone(); opt.step(); out.append((before - opt_p).norm().item())
        return out
    ours, theirs = run(m.ClipNormGrowth(min_value=4.0)), run(tz.m.ClipNormGrowth(min_value=4.0))
    assert ours == pytest.approx([2.0] * 6, abs=1e-12)                 # a constant stream passes unchanged
    assert theirs[1:] == pytest.approx([0.5] * 5, abs=1e-12)           # torchzero: 2 / min_value each step


def test_normalize_by_ema_sets_the_ema_norm():
    "After NormalizeByEMA (tensor-wise, no growth cap) each tensor's update norm is the norm of the EMA of raw updates"
    ps = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    opt = Modular(ps, m.NormalizeByEMA(beta=0.9, max_ema_growth=None))
    ema = [torch.zeros_like(p) for p in ps]
    g = torch.Generator().manual_seed(3)
    for t in range(10):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) * spike(t) for p in ps]
        for p, gr, e in zip(ps, grads, ema): p.grad = gr.clone(); e.mul_(0.9).add_(0.1 * gr)
        before = [p.detach().clone() for p in ps]
        opt.step()
        for b, p, gr, e in zip(before, ps, grads, ema):
            step = b - p.detach()
            torch.testing.assert_close(step, gr * (e.norm() / gr.norm()), rtol=1e-12, atol=0)


def test_medianveraging_is_median_averaging():
    assert m.Medianveraging is m.MedianAveraging


def test_readme_quick_start_runs_with_the_import_swapped():
    "torchzero's README quick start, verbatim but for the import; the loss must fall"
    import torch
    from torch import nn
    import optim_lab.modular as tz
    torch.manual_seed(0)
    model = nn.Linear(10, 1)
    criterion = nn.MSELoss()
    inputs = torch.randn(5, 10)
    targets = torch.randn(5, 1)
    optimizer = tz.Modular(
        model.parameters(),
        tz.m.ClipValue(10),
        tz.m.Adam(),
        tz.m.NormalizeByEMA(max_ema_growth=1.1),
        tz.m.WeightDecay(1e-4),
        tz.m.LR(1e-1),
    )
    losses = []
    for epoch in range(100):
        optimizer.zero_grad()
        output = model(inputs)
        loss = criterion(output, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # 5 points, 11 parameters: the fit can interpolate; a tenth of the first loss leaves a wide margin
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize('make, text', [
    (lambda: m.ClipNormByEMA(beta=1.0), 'ClipNormByEMA: beta=1.0'),
    (lambda: m.NormalizeByEMA(max_ema_growth=0.5), 'NormalizeByEMA: max_ema_growth=0.5'),
    (lambda: m.ClipNormByEMA(inner=m.Adam()), 'ClipNormByEMA: inner='),
    (lambda: m.ClipValueByEMA(beta=-0.1), 'ClipValueByEMA: beta=-0.1'),
    (lambda: m.ClipNormGrowth(mul=0.9), 'ClipNormGrowth: mul=0.9'),
    (lambda: m.ClipValueGrowth(add=-1), 'ClipValueGrowth: add=-1'),
    (lambda: m.Averaging(0), 'Averaging: history_size=0'),
    (lambda: m.Averaging(2.5), 'Averaging: history_size=2.5'),
    (lambda: m.WeightedAveraging([]), 'WeightedAveraging: weights=[]'),
    (lambda: m.MedianAveraging(-3), 'MedianAveraging: history_size=-3'),
    (lambda: m.ScaleByGradCosineSimilarity(eps=-1.0), 'ScaleByGradCosineSimilarity: eps=-1.0'),
    (lambda: m.MatrixMomentum(0.1, mu=-1), 'MatrixMomentum: mu=-1'),
    (lambda: m.MatrixMomentum(0.1, hvp_method='fd_forward'), "MatrixMomentum: hvp_method='fd_forward'"),
    (lambda: m.MatrixMomentum(0.1, adapt_freq=5), 'MatrixMomentum: adapt_freq=5'),
])
def test_bad_arguments_raise_value_error(make, text):
    with pytest.raises(ValueError) as e: make()
    assert text in str(e.value)


def test_bad_group_override_raises_before_any_state():
    p = torch.zeros(3, requires_grad=True)
    opt = Modular([p], m.ClipNormByEMA(), m.LR(0.1))
    with pytest.raises(ValueError, match=r'ClipNormByEMA: beta=2 is outside the allowed range'):
        opt.param_groups[0]['beta'] = 2
    assert not opt.state


def test_positional_order_matches_torchzero():
    import inspect
    for name in ('ClipNormByEMA', 'NormalizeByEMA', 'ClipValueByEMA', 'ClipNormGrowth', 'ClipValueGrowth', 'Averaging',
                 'WeightedAveraging', 'MedianAveraging', 'MatrixMomentum', 'ScaleByGradCosineSimilarity'):
        ours = inspect.signature(getattr(m, name)).parameters
        theirs = inspect.signature(getattr(tz.m, name)).parameters
        assert list(ours) == list(theirs), name
        assert [p.default for p in ours.values()] == [p.default for p in theirs.values()], name


def test_state_dict_round_trip():
    spec = [('ClipNormByEMA', dict(tensorwise=False)), ('Averaging', dict(history_size=3)),
            ('MedianAveraging', dict(history_size=3)), ('WeightedAveraging', dict(weights=[1, 2])),
            ('ClipNormGrowth', dict(tensorwise=False)), LR_]
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]
    opt = Modular(ps, *[getattr(m, n)(**kw) for n, kw in spec])
    def run(o, ts):
        for t in ts: o.zero_grad(); loss_at(ps, t).backward(); o.step()
    run(opt, range(10))
    sd, saved = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]   # torch's state_dict holds references
    run(opt, range(10, 20)); straight = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p, s in zip(ps, saved): p.copy_(s)
    opt2 = Modular(ps, *[getattr(m, n)(**kw) for n, kw in spec]); opt2.load_state_dict(sd)
    run(opt2, range(10, 20))
    assert max(max_dev([straight], [[p.detach() for p in ps]]), 0) == 0.0


# %% FSDP2-style sharded parameters: 2 gloo ranks, each parameter a DTensor sharded on dim 0 (uneven shards)

DIST_SPECS = {
    'ClipNormByEMA': [('ClipNormByEMA', {}), LR_],
    'NormalizeByEMA-global': [('NormalizeByEMA', dict(tensorwise=False)), LR_],
    'ClipValueByEMA': [('ClipValueByEMA', {}), LR_],
    'ClipNormGrowth-global': [('ClipNormGrowth', dict(tensorwise=False)), LR_],
    'ClipNormGrowth': [('ClipNormGrowth', dict(add=0.2)), LR_],
    'ClipValueGrowth': [('ClipValueGrowth', dict(add=0.1)), LR_],
    'Averaging': [('Averaging', dict(history_size=3)), LR_],
    'WeightedAveraging': [('WeightedAveraging', dict(weights=[1.0, 2.0])), LR_],
    'MedianAveraging': [('MedianAveraging', dict(history_size=4)), LR_],
    'ScaleByGradCosineSimilarity': [('HeavyBall', {}), ('ScaleByGradCosineSimilarity', {}), LR_],
}
DIST_SHAPES = ((5,), (3, 4), (1, 6))   # 5 rows on 2 ranks: 3 + 2; one row: rank 1 holds none


def dist_run(spec, shard=None):
    "8 steps of a spiky loss; `shard(t)` makes a parameter's tensor (a DTensor on the 2 ranks), None for one process"
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=g, dtype=torch.float64) for s in DIST_SHAPES]
    ps = [torch.nn.Parameter(shard(t) if shard else t.clone()) for t in full]
    opt = Modular(ps, *[getattr(m, n)(**kw) for n, kw in spec])
    for t in range(8):
        # the gradient of the whole parameter, sharded as the parameter: what FSDP2's reduce-scatter leaves in p.grad
        whole = [(p.full_tensor() if shard else p.detach()).clone().requires_grad_() for p in ps]
        grads = torch.autograd.grad(loss_at(whole, t), whole)
        for p, gr in zip(ps, grads): p.grad = shard(gr) if shard else gr
        opt.step()
    return [(p.full_tensor() if shard else p.detach()).tolist() for p in ps]


def _worker(mesh, out_dir):
    return {name: dist_run(spec, shard_rows(mesh)) for name, spec in DIST_SPECS.items()}


@pytest.fixture(scope='module')
def sharded_results(tmp_path_factory):
    return rank_results(__file__, tmp_path_factory.mktemp('ranks'))[0]   # rank 0's


@pytest.mark.parametrize('name', list(DIST_SPECS))
def test_sharded_parameters_end_where_one_process_ends(name, sharded_results):
    "Whole-tensor norms and the global cosine are reductions on the DTensor: 2 ranks agree with one process to rounding"
    ours = [torch.tensor(x, dtype=torch.float64) for x in sharded_results[name]]
    ref = [torch.tensor(x, dtype=torch.float64) for x in dist_run(DIST_SPECS[name])]
    assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= 1e-12


if WORKER: serve_rank(_worker)
