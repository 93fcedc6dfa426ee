"""The ops and plumbing modules of `optim_lab.modular.m` (chapter 67) and RMSprop's `inner=` (chapter 61): each against
torchzero 0.4.4 along whole float64 trajectories (with per-group settings), against float64 transcriptions where
chapter 67 follows the paper or torchzero's own docstring instead, the README's Adam-from-ops recipes against `m.Adam`,
bad arguments, `state_dict` resume through nested chains, and the whole-tensor modules on FSDP2-sharded parameters."""
from __future__ import annotations
import copy
import inspect
import math
import os
import warnings

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch
from torch import nn, Tensor

from optim_lab.modular import Modular, m
import optim_lab.modular.ops as ops
from distributed_harness import is_rank, rank_results, serve_rank

tz = pytest.importorskip('torchzero')
warnings.filterwarnings('ignore', module='torchzero')

SHAPES = ((5,), (4, 3), (2, 3, 2), ())
STEPS = 50


def make_params(shapes=SHAPES, seed=0, dtype=torch.float64) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def objective(ps):
    "Smooth, non-quadratic, a different scale per tensor"
    return sum(((p - 0.3) ** 2 * (i + 1)).sum() + 0.1 * (p ** 4).sum() for i, p in enumerate(ps))


def trajectory(make_opt, shapes=SHAPES, groups=None, steps=STEPS):
    ps = make_params(shapes)
    opt = make_opt(groups(ps) if groups else ps)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        objective(ps).backward()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def assert_same_path(a, b, atol=1e-7):
    for t, (sa, sb) in enumerate(zip(a, b)):
        for x, y in zip(sa, sb): torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=lambda s: f'step {t + 1}: {s}')


def moved(path) -> float:
    start = make_params()
    return max((x - s).abs().max().item() for x, s in zip(path[-1], start))


# %% every module against torchzero 0.4.4: one builder, called with optim_lab's `m` or torchzero's `tz.m`

def two_groups(ps):
    "Per-group settings: the second group overrides settings that both libraries read per parameter"
    return [{'params': ps[:2]}, {'params': ps[2:], 'beta': 0.95, 'beta2': 0.95, 'start_lr': 0.2, 'sigma': 3.0}]

CASES = {
    'Add(number)': lambda L: [L.Add(0.5), L.LR(1e-2)],
    'Add(module, alpha)': lambda L: [L.Add(L.Sign(), alpha=0.5), L.LR(1e-2)],
    'Add(chain)': lambda L: [L.Add([L.EMA(0.5), L.Sign()], alpha=-0.3), L.LR(1e-2)],
    'DivModules(modules)': lambda L: [L.DivModules(L.EMA(0.9), [L.EMASquared(0.99), L.Sqrt(), L.Add(1e-3)]), L.LR(1e-2)],
    'DivModules(number, chain)': lambda L: [L.DivModules(1.0, [L.Pow(2), L.Add(1.0)]), L.GradSign(), L.LR(1e-2)],
    'DivModules(chain, number)': lambda L: [L.DivModules([L.EMA(0.5)], 4.0), L.LR(1e-2)],
    'DivModules(other_first)': lambda L: [L.DivModules(L.EMA(0.9), [L.Pow(2), L.Add(1.0), L.Sqrt()], other_first=True), L.LR(1e-2)],
    'Pow(number)': lambda L: [L.Pow(2), L.GradSign(), L.LR(1e-2)],
    'Pow(module)': lambda L: [L.Pow(L.Sign()), L.LR(1e-2)],   # u ** sign(u): a positive base only where u > 0
    'Sqrt': lambda L: [L.Pow(2), L.Sqrt(), L.GradSign(), L.LR(1e-2)],
    'Identity(any args)': lambda L: [L.Identity(1, 2, key='value'), L.LR(1e-2)],
    'GradSign': lambda L: [L.EMA(0.9), L.GradSign(), L.LR(1e-2)],
    'EMASquared': lambda L: [L.EMASquared(0.99), L.Sqrt(), L.GradSign(), L.LR(1e-2)],
    'EMASquared(amsgrad, pow=3)': lambda L: [L.EMASquared(0.9, amsgrad=True, pow=3), L.Pow(1 / 3), L.GradSign(), L.LR(1e-2)],
    'EMASquared(pow=1)': lambda L: [L.EMASquared(0.9, pow=1), L.GradSign(), L.LR(1e-2)],
    'SqrtEMASquared': lambda L: [L.SqrtEMASquared(0.99), L.GradSign(), L.LR(1e-2)],
    'SqrtEMASquared(amsgrad, debiased, pow=4)': lambda L: [L.SqrtEMASquared(0.9, True, True, 4), L.GradSign(), L.LR(1e-2)],
    'Debias(beta1, beta2)': lambda L: [L.EMA(0.9), L.Debias(0.9, 0.99), L.LR(1e-2)],
    'Debias(alpha, pow)': lambda L: [L.Debias(beta2=0.9, alpha=0.5, pow=3), L.LR(1e-2)],
    'Debias()': lambda L: [L.Debias(), L.LR(1e-2)],
    'Debias2': lambda L: [L.Debias2(), L.LR(1e-2)],
    'Debias2(pow=3)': lambda L: [L.Debias2(0.9, 3), L.LR(1e-2)],
    'AccumulateMaximum': lambda L: [L.AccumulateMaximum(), L.LR(1e-2)],
    'Graft(tensorwise)': lambda L: [L.Graft(L.Sign(), L.RMSprop()), L.LR(1e-2)],
    'Graft(global, strength, ord=1)': lambda L: [L.Graft([L.EMA(0.5), L.Sign()], L.EMA(0.9), tensorwise=False, ord=1, strength=0.7), L.LR(1e-2)],
    'Graft(eps)': lambda L: [L.Graft(L.Sign(), [L.Add(1.0)], eps=10.0), L.LR(1e-2)],
    'VectorProjection(Normalize, EMA)': lambda L: [L.VectorProjection([L.Normalize(1.0), L.EMA(0.9)]), L.LR(1e-2)],
    'VectorProjection(ClipNorm)': lambda L: [L.VectorProjection(L.ClipNorm(2.0)), L.LR(1e-2)],
    'LaplacianSmoothing': lambda L: [L.LaplacianSmoothing(), L.LR(1e-2)],
    'LaplacianSmoothing(sigma, min_numel=3)': lambda L: [L.LaplacianSmoothing(sigma=2.0, min_numel=3), L.LR(1e-2)],
    'LaplacianSmoothing(layerwise=False)': lambda L: [L.LaplacianSmoothing(0.5, layerwise=False), L.LR(1e-2)],
    'OrthoGrad(one vector)': lambda L: [L.OrthoGrad(**({} if L is tz.m else dict(tensorwise=False))), L.LR(1e-2)],
    'OrthoGrad(one vector, eps, no renormalize)': lambda L: [L.OrthoGrad(0.1, False, **({} if L is tz.m else dict(tensorwise=False))), L.LR(1e-2)],
    'Warmup': lambda L: [L.Warmup(), L.LR(1e-2)],
    'Warmup(steps, start, end)': lambda L: [L.Warmup(10, 0.1, 0.5), L.LR(1e-2)],
    'RMSprop(inner=EMA)': lambda L: [L.RMSprop(0.99, inner=L.EMA(0.9)), L.LR(1e-2)],
    'RMSprop(centered, inner=[EMA, Sign])': lambda L: [L.RMSprop(0.9, 1e-3, True, inner=[L.EMA(0.5), L.Sign()]), L.LR(1e-2)],
    'RMSprop(init=update, inner=EMA)': lambda L: [L.RMSprop(0.9, init='update', inner=L.EMA(0.5)), L.LR(1e-2)],
    'RMSprop(exp_avg_sq_tfm)': lambda L: [L.RMSprop(0.99, debias=True, exp_avg_sq_tfm=L.Add(1e-2)), L.LR(1e-2)],
}
GROUPED = ('DivModules(modules)', 'EMASquared', 'SqrtEMASquared(amsgrad, debiased, pow=4)', 'Debias(beta1, beta2)',
           'Debias2', 'Warmup(steps, start, end)', 'LaplacianSmoothing')


@pytest.mark.parametrize('name', list(CASES))
def test_against_torchzero(name):
    ours = trajectory(lambda ps: Modular(ps, *CASES[name](m)))
    theirs = trajectory(lambda ps: tz.Optimizer(ps, *CASES[name](tz.m)))
    assert moved(ours) > 1e-3
    assert_same_path(ours, theirs)


@pytest.mark.parametrize('name', GROUPED)
def test_against_torchzero_with_group_settings(name):
    ours = trajectory(lambda ps: Modular(ps, *CASES[name](m)), groups=two_groups)
    theirs = trajectory(lambda ps: tz.Optimizer(ps, *CASES[name](tz.m)), groups=two_groups)
    plain = trajectory(lambda ps: Modular(ps, *CASES[name](m)))
    assert_same_path(ours, theirs)
    assert max((x - y).abs().max().item() for x, y in zip(ours[-1], plain[-1])) > 1e-6   # the overrides took effect


def test_add_alpha_per_group():
    "torchzero 0.4.4's Add reads `alpha` from its own defaults only; here a param group's `alpha` applies to its tensors"
    groups = lambda ps: [{'params': ps[:2]}, {'params': ps[2:], 'alpha': 0.25}]
    ours = trajectory(lambda ps: Modular(ps, m.Add(m.Sign(), alpha=2.0), m.LR(1e-2)), groups=groups)
    class Reference(torch.optim.Optimizer):
        def __init__(self, params): super().__init__(params, {'alpha': 2.0})
        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g['params']: p.sub_(1e-2 * (p.grad + g['alpha'] * torch.sign(p.grad)))
    assert_same_path(ours, trajectory(Reference, groups=groups), atol=1e-12)


# %% the README's low-level Adam recipes

def recipes(eps=1e-8, amsgrad=False, inner_debias=False, L=m):
    return {
        1: [L.RMSprop(0.999, eps=eps, debias=True, init='zeros', inner=L.EMA(0.9, debias=inner_debias))],
        2: [L.DivModules(L.EMA(0.9, debias=True), [L.SqrtEMASquared(0.999, debiased=True), L.Add(eps)])],
        3: [L.DivModules([L.EMA(0.9), L.Debias(beta1=0.9, beta2=0.999)], [L.EMASquared(0.999), L.Sqrt(), L.Add(eps)])],
        4: [L.DivModules([L.EMA(0.9), L.Debias(beta1=0.9)],
                         [L.Pow(2), L.EMA(0.999), L.AccumulateMaximum() if amsgrad else L.Identity(), L.Sqrt(),
                          L.Debias2(beta=0.999), L.Add(eps)])]}


@pytest.mark.parametrize('eps', [1e-8, 0.1])
def test_readme_recipes_are_adam(eps):
    adam = trajectory(lambda ps: Modular(ps, m.Adam(eps=eps), m.LR(1e-2)))
    for k in (2, 4):
        assert_same_path(trajectory(lambda ps: Modular(ps, *recipes(eps)[k], m.LR(1e-2))), adam, atol=1e-12)
    assert_same_path(trajectory(lambda ps: Modular(ps, *recipes(eps, inner_debias=True)[1], m.LR(1e-2))), adam, atol=1e-12)
    ams = trajectory(lambda ps: Modular(ps, m.Adam(eps=eps, amsgrad=True), m.LR(1e-2)))
    assert_same_path(trajectory(lambda ps: Modular(ps, *recipes(eps, amsgrad=True)[4], m.LR(1e-2))), ams, atol=1e-12)


def test_readme_recipes_that_are_not_adam():
    "Recipe 1 as written has an undebiased numerator (as in torchzero); recipe 3 is torchzero's Adam (ε not rescaled)"
    adam = trajectory(lambda ps: Modular(ps, m.Adam(eps=0.1), m.LR(1e-2)))
    r1 = trajectory(lambda ps: Modular(ps, *recipes()[1], m.LR(1e-2)))
    assert_same_path(r1, trajectory(lambda ps: tz.Optimizer(ps, *recipes(L=tz.m)[1], tz.m.LR(1e-2))))
    r3 = trajectory(lambda ps: Modular(ps, *recipes(0.1)[3], m.LR(1e-2)))
    assert_same_path(r3, trajectory(lambda ps: tz.Optimizer(ps, tz.m.Adam(eps=0.1), tz.m.LR(1e-2))), atol=1e-12)
    assert max((x - y).abs().max().item() for x, y in zip(r3[-1], adam[-1])) > 1e-3


def test_rmsprop_debiased_spelling():
    a = trajectory(lambda ps: Modular(ps, m.RMSprop(0.99, debiased=True), m.LR(1e-2)))
    b = trajectory(lambda ps: Modular(ps, m.RMSprop(0.99, debias=True), m.LR(1e-2)))
    assert_same_path(a, b, atol=0)
    with pytest.raises(ValueError, match='disagree'): m.RMSprop(debias=True, debiased=False)


def test_ema_debiased_spelling():
    "EMA(debiased=) is EMA(debias=), as RMSprop's alias; README recipe 2 as printed is Adam"
    a = trajectory(lambda ps: Modular(ps, m.EMA(0.9, debiased=True), m.LR(1e-2)))
    b = trajectory(lambda ps: Modular(ps, m.EMA(0.9, debias=True), m.LR(1e-2)))
    assert_same_path(a, b, atol=0)
    assert_same_path(trajectory(lambda ps: Modular(ps, m.EMA(0.9, debias=False, debiased=False), m.LR(1e-2))),
                     trajectory(lambda ps: Modular(ps, m.EMA(0.9), m.LR(1e-2))), atol=0)
    with pytest.raises(ValueError, match='disagree'): m.EMA(debias=True, debiased=False)
    with pytest.raises(TypeError): m.EMA(0.9, 0, False, True, 'zeros', True)   # keyword-only: positional slots stay torchzero's
    recipe_2 = m.DivModules(m.EMA(0.9, debiased=True), [m.SqrtEMASquared(0.999, debiased=True), m.Add(1e-8)])
    assert_same_path(trajectory(lambda ps: Modular(ps, recipe_2, m.LR(1e-2))),
                     trajectory(lambda ps: Modular(ps, m.Adam(), m.LR(1e-2))), atol=1e-12)


# torchzero's README, "Low level modules": its equivalent ways to make Adam, verbatim (`amsgrad` is the README's free name)
README_RECIPES = [
    """tz.m.Adam()""",
    """tz.m.RMSprop(0.999, debiased=True, init='zeros', inner=tz.m.EMA(0.9))""",
    """tz.m.DivModules(
    tz.m.EMA(0.9, debiased=True),
    [tz.m.SqrtEMASquared(0.999, debiased=True), tz.m.Add(1e-8)]
)""",
    """tz.m.DivModules(
    [tz.m.EMA(0.9), tz.m.Debias(beta1=0.9, beta2=0.999)],
    [tz.m.EMASquared(0.999), tz.m.Sqrt(), tz.m.Add(1e-8)]
)""",
    """tz.m.DivModules(
    [tz.m.EMA(0.9), tz.m.Debias(beta1=0.9)],
    [
        tz.m.Pow(2),
        tz.m.EMA(0.999),
        tz.m.AccumulateMaximum() if amsgrad else tz.m.Identity(),
        tz.m.Sqrt(),
        tz.m.Debias2(beta=0.999),
        tz.m.Add(1e-8)]
)"""]


@pytest.mark.parametrize('amsgrad', [False, True])
@pytest.mark.parametrize('i', range(len(README_RECIPES)))
def test_readme_recipes_run_with_the_import_swapped(i, amsgrad):
    "Each recipe trains with `import optim_lab.modular as tz`, the one spelled `EMA(debiased=True)` too (torchzero 0.4.4 refuses that spelling)"
    import optim_lab.modular as ours
    import torchzero as theirs
    if 'EMA(0.9, debiased=True)' in README_RECIPES[i]:
        with pytest.raises(TypeError, match='debiased'): eval(README_RECIPES[i], dict(tz=theirs, amsgrad=amsgrad))
    torch.manual_seed(0)
    model, inputs, targets = nn.Linear(10, 1), torch.randn(20, 10), torch.randn(20, 1)
    opt = ours.Modular(model.parameters(), eval(README_RECIPES[i], dict(tz=ours, amsgrad=amsgrad)), ours.m.LR(1e-2))
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])   # measured: 0.70 -> 0.13 in 200 steps


# %% where chapter 67 follows the paper or the docstring: float64 transcriptions

class Transcription(torch.optim.Optimizer):
    def __init__(self, params, rule): super().__init__(params, {}); self.rule = rule
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']: p.sub_(self.rule(p.grad, p, self.state[p]))


def test_orthograd_per_tensor_is_the_authors_rule():
    def rule(g, p, st):
        w, v = p.reshape(-1), g.reshape(-1)
        orth = v - (w @ v) / (w @ w + 1e-8) * w
        return 1e-2 * (orth * v.norm() / orth.norm()).view_as(g)
    ours = trajectory(lambda ps: Modular(ps, m.OrthoGrad(), m.LR(1e-2)))
    assert_same_path(ours, trajectory(lambda ps: Transcription(ps, rule)), atol=1e-12)
    one = lambda make: trajectory(make, shapes=((4, 3),))        # one tensor: torchzero's one-vector rule is the same
    assert_same_path(one(lambda ps: Modular(ps, m.OrthoGrad(), m.LR(1e-2))),
                     one(lambda ps: tz.Optimizer(ps, tz.m.OrthoGrad(), tz.m.LR(1e-2))))


def test_orthograd_keeps_a_parallel_update_zero():
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([2.0, 4.0], dtype=torch.float64)
    Modular([p], m.OrthoGrad(eps=0.0), m.LR(1.0)).step()
    assert p.detach().tolist() == [1.0, 2.0]


def dense_smooth(u, sigma):
    n = u.numel()
    eye = torch.eye(n, dtype=torch.float64)
    L = -2 * eye + torch.roll(eye, 1, 0) + torch.roll(eye, -1, 0)
    return torch.linalg.solve(eye - sigma * L, u.reshape(-1).double()).view(u.shape)


@pytest.mark.parametrize('layerwise', [True, False])
def test_laplacian_smoothing_is_the_dense_solve(layerwise):
    "Tensors with exactly `min_numel` elements are smoothed too (its docstring; torchzero 0.4.4 needs more)"
    shapes = ((4,), (3, 5), (2,), (2, 2, 3))
    if layerwise:
        rule = lambda g, p, st: 1e-2 * (dense_smooth(g, 2.0) if g.numel() >= 4 else g)
        ref = trajectory(lambda ps: Transcription(ps, rule), shapes=shapes)
    else:
        class Whole(torch.optim.Optimizer):
            def __init__(self, params): super().__init__(params, {})
            @torch.no_grad()
            def step(self):
                ps = self.param_groups[0]['params']
                y = dense_smooth(torch.cat([p.grad.reshape(-1) for p in ps]), 2.0)
                for p, piece in zip(ps, y.split([p.numel() for p in ps])): p.sub_(1e-2 * piece.view_as(p))
        ref = trajectory(Whole, shapes=shapes)
    ours = trajectory(lambda ps: Modular(ps, m.LaplacianSmoothing(2.0, layerwise), m.LR(1e-2)), shapes=shapes)
    assert_same_path(ours, ref, atol=1e-12)


def test_accumulate_maximum_decays_the_stored_maximum():
    def rule(g, p, st):
        st['M'] = 0.8 * torch.maximum(st.get('M', torch.zeros_like(g)), g)
        return 1e-2 * st['M']
    ours = trajectory(lambda ps: Modular(ps, m.AccumulateMaximum(decay=0.2), m.LR(1e-2)))
    assert_same_path(ours, trajectory(lambda ps: Transcription(ps, rule)), atol=1e-12)


def test_warmup_zero_steps_is_no_warmup():
    assert_same_path(trajectory(lambda ps: Modular(ps, m.Warmup(0, 0.5), m.LR(1e-2))),
                     trajectory(lambda ps: Modular(ps, m.LR(1e-2))), atol=0)


# %% names, signatures, arguments

NAMES = ['Add', 'DivModules', 'Pow', 'Sqrt', 'EMASquared', 'SqrtEMASquared', 'Debias', 'Debias2', 'AccumulateMaximum',
         'Identity', 'Graft', 'VectorProjection', 'LaplacianSmoothing', 'OrthoGrad', 'GradSign', 'Warmup', 'RMSprop']


@pytest.mark.parametrize('name', NAMES)
def test_signature_is_torchzeros(name):
    "torchzero's arguments, in its order, with its defaults (ours may add arguments after them)"
    ours = list(inspect.signature(getattr(m, name)).parameters.values())
    theirs = list(inspect.signature(getattr(tz.m, name)).parameters.values())
    assert [(p.name, p.default) for p in ours[:len(theirs)]] == [(p.name, p.default) for p in theirs]


def test_graft_modules_is_graft():
    assert m.GraftModules is m.Graft


BAD = [(lambda: m.EMASquared(beta=1.0), 'EMASquared: beta=1.0 is outside the allowed range [0, 1)'),
       (lambda: m.SqrtEMASquared(pow=0), 'SqrtEMASquared: pow=0 is outside the allowed range (0, ∞)'),
       (lambda: m.Debias(beta2=-0.1), 'Debias: beta2=-0.1 is outside the allowed range [0, 1) or None'),
       (lambda: m.Debias2(beta=1), 'Debias2: beta=1 is outside the allowed range [0, 1)'),
       (lambda: m.AccumulateMaximum(decay=-1), 'AccumulateMaximum: decay=-1 is outside the allowed range [0, 1]'),
       (lambda: m.Graft(m.Sign(), [], ), "Graft: magnitude=[] is outside the allowed range: a module or a non-empty list"),
       (lambda: m.Graft(m.Sign(), m.Adam(), eps=-1), 'Graft: eps=-1 is outside the allowed range [0, ∞)'),
       (lambda: m.VectorProjection(3), 'VectorProjection: modules=3 is outside the allowed range: a module or a non-empty list'),
       (lambda: m.VectorProjection(m.Adam(), project_params=False), 'project_params=False is not supported'),
       (lambda: m.LaplacianSmoothing(sigma=-1), 'LaplacianSmoothing: sigma=-1 is outside the allowed range [0, ∞)'),
       (lambda: m.LaplacianSmoothing(layerwise=1), 'LaplacianSmoothing: layerwise=1 is outside the allowed range {False, True}'),
       (lambda: m.OrthoGrad(renormalize='yes'), "OrthoGrad: renormalize='yes' is outside the allowed range {False, True}"),
       (lambda: m.Warmup(steps=-1), 'Warmup: steps=-1 is outside the allowed range integers in [0, ∞)'),
       (lambda: m.Warmup(start_lr=-1.0), 'Warmup: start_lr=-1.0 is outside the allowed range [0, ∞)'),
       (lambda: m.DivModules(1.0, 2.0), 'DivModules: input=1.0, other=2.0 are both numbers'),
       (lambda: m.DivModules(m.Sign(), 'x'), "DivModules: other='x' is outside the allowed range: a number, a module"),
       (lambda: m.DivModules(m.Sign(), m.Sign(), other_first=2), 'DivModules: other_first=2 is outside the allowed range {False, True}'),
       (lambda: m.Add(None), 'Add: other=None is outside the allowed range'),
       (lambda: m.Add(1.0, alpha=float('nan')), 'Add: alpha=nan is outside the allowed range'),
       (lambda: m.Pow(True), 'Pow: exponent=True is outside the allowed range'),
       (lambda: m.RMSprop(exp_avg_sq_tfm='sqrt'), "RMSprop: exp_avg_sq_tfm='sqrt' is outside the allowed range")]


@pytest.mark.parametrize('make,says', BAD, ids=[s.split(':')[0] + str(i) for i, (_, s) in enumerate(BAD)])
def test_bad_arguments(make, says):
    with pytest.raises(ValueError) as e: make()
    assert says in str(e.value)


def test_group_settings_are_checked_inside_operands():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r'EMASquared: beta=1.5 is outside'):
        Modular([{'params': [x], 'beta': 1.5}], m.DivModules(m.EMA(), [m.EMASquared(), m.Sqrt()]), m.LR(0.1))
    opt = Modular([x], m.RMSprop(inner=m.Warmup()), m.LR(0.1))
    with pytest.raises(ValueError, match=r'Warmup: steps=0.5 is outside'): opt.param_groups[0]['steps'] = 0.5


def test_tensorwise_follows_the_children():
    assert m.DivModules(m.EMA(), [m.Pow(2), m.Sqrt()]).tensorwise
    assert not m.DivModules(m.EMA(), [m.OrthoGrad(tensorwise=False)]).tensorwise
    assert not m.RMSprop(inner=m.Graft(m.Sign(), m.Adam(), tensorwise=False)).tensorwise
    assert m.RMSprop(inner=m.EMA()).tensorwise and not m.VectorProjection(m.EMA()).tensorwise


def test_no_item_in_update_paths():
    "No host synchronisation in a step: every scalar the modules compute from tensors stays a tensor"
    assert '.item()' not in inspect.getsource(ops)


# %% state_dict resume through nested chains

@pytest.mark.parametrize('build', [
    lambda: [m.DivModules([m.EMA(0.9), m.Debias(beta1=0.9)], [m.Pow(2), m.EMA(0.999), m.AccumulateMaximum(), m.Sqrt(),
                                                               m.Debias2(beta=0.999), m.Add(1e-8)]), m.LR(1e-2)],
    lambda: [m.VectorProjection([m.EMA(0.9), m.Normalize()]), m.Warmup(5), m.LR(1e-2)],
    lambda: [m.RMSprop(inner=m.EMA(0.9), exp_avg_sq_tfm=m.Add(1e-3)), m.Graft(m.Sign(), m.Adam(), tensorwise=False), m.LR(1e-2)]],
    ids=['adam_from_ops', 'vector_projection', 'rmsprop_inner_graft'])
def test_state_dict_resume(build):
    def steps(opt, ps, n):
        for _ in range(n):
            opt.zero_grad(); objective(ps).backward(); opt.step()
    whole = make_params(); opt = Modular(whole, *build()); steps(opt, whole, 20)
    first = make_params(); opt = Modular(first, *build()); steps(opt, first, 10)
    saved = copy.deepcopy(opt.state_dict())
    again = [p.detach().clone().requires_grad_() for p in first]
    opt2 = Modular(again, *build()); opt2.load_state_dict(saved); steps(opt2, again, 10)
    for a, b in zip(whole, again): assert torch.equal(a, b)
    assert any('/' in k for s in saved['state'].values() for k in s) or 'VectorProjection' in str(saved['state'][0])


# %% FSDP2: the whole-tensor modules on sharded parameters match one process

FSDP_CHAINS = {
    'orthograd_laplacian': lambda: [m.OrthoGrad(), m.LaplacianSmoothing(), m.LR(5e-2)],
    'orthograd_one_vector': lambda: [m.OrthoGrad(tensorwise=False), m.LR(5e-2)],
    'laplacian_one_vector': lambda: [m.LaplacianSmoothing(layerwise=False), m.LR(5e-2)],
    'vector_projection': lambda: [m.VectorProjection([m.Normalize(), m.EMA(0.5)]), m.LR(5e-2)],
    'graft_global': lambda: [m.Graft(m.Sign(), m.Adam(), tensorwise=False), m.LR(5e-2)],
}


def _fsdp_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5))   # 6 and 5 rows on 2 ranks: even and uneven shards


def _fsdp_train(model, modules, steps=6):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 5, generator=gen)
    opt = Modular(model.parameters(), *modules)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _fsdp_worker(mesh, out_dir):
    "On each of the 2 ranks: each chain trains an FSDP2-sharded copy of the model; the full weights"
    from torch.distributed.fsdp import fully_shard
    from optim_lab.distributed import full_tensor
    weights = {}
    for name, build in FSDP_CHAINS.items():
        model = _fsdp_model()
        for layer in (model[0], model[2]): fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        _fsdp_train(model, build())
        weights[name] = [full_tensor(p.detach()) for p in model.parameters()]
    return weights


def test_whole_tensor_modules_under_fsdp2_match_one_process(tmp_path):
    sharded = rank_results(__file__, tmp_path)[0]   # rank 0's
    start = list(_fsdp_model().parameters())
    for name, build in FSDP_CHAINS.items():
        model = _fsdp_model()
        _fsdp_train(model, build())
        for a, b in zip(sharded[name], model.parameters(), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6, msg=lambda s: f'{name}: {s}')
        assert max((a - s).abs().max() for a, s in zip(sharded[name], start)) > 1e-3, name   # it moved


if is_rank(__name__): serve_rank(_fsdp_worker)
