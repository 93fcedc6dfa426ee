"""Prodigy, DAdaptAdam and DAdaptSGD (nbs/71_prodigy_dadapt.ipynb): float64 transcriptions of the papers' algorithms
on one group of mixed 1-D/2-D parameters, the estimate d (starts at d0, never falls, growth-bounded, per group, saved
with the state), and pytorch-optimizer where it follows the algorithm."""
from __future__ import annotations
import copy, io, math

import pytest
import torch
from peer_versions import peer_is

import pytorch_optimizer as PO
from optim_lab.optimizers.prodigy_dadapt import DAdaptAdam, DAdaptSGD, Prodigy

SHAPES = ((7,), (4, 5), (3,), (2, 3, 2))   # vectors, a matrix, a 3-tensor: all in one group
STEPS = 60


# %% Float64 transcriptions: one list of parameters per group, a plain loop over steps

def prodigy_reference(thetas, grad_fn, steps, lr=1.0, betas=(0.9, 0.999), beta3=None, d0=1e-6, d_coef=1.0,
                      growth_rate=math.inf, weight_decay=0.0, decoupled_wd=True, bias_correction=False,
                      safeguard_warmup=False, eps=1e-8, maximize=False):
    "Mishchenko & Defazio, Algorithm 4, with the authors' d_coef, growth_rate, bias_correction and safeguard_warmup"
    b1, b2 = betas
    b3 = math.sqrt(b2) if beta3 is None else beta3
    x0 = [t.clone() for t in thetas]
    x = [t.clone() for t in thetas]
    m = [torch.zeros_like(t) for t in thetas]
    v = [torch.zeros_like(t) for t in thetas]
    s = [torch.zeros_like(t) for t in thetas]
    r, d, d_max, out = 0.0, d0, d0, []
    for k in range(1, steps + 1):
        g = grad_fn(x, k)
        if maximize: g = [-a for a in g]
        if not decoupled_wd: g = [a + weight_decay * b for a, b in zip(g, x)]
        eta = lr * (math.sqrt(1 - b2 ** k) / (1 - b1 ** k) if bias_correction else 1.0)
        r = b3 * r + eta * d ** 2 / d0 * sum(float((gi * (x0i - xi)).sum()) for gi, x0i, xi in zip(g, x0, x))
        for i in range(len(x)):
            m[i] = b1 * m[i] + (1 - b1) * d * g[i]
            v[i] = b2 * v[i] + (1 - b2) * d ** 2 * g[i] ** 2
            s[i] = b3 * s[i] + (d if safeguard_warmup else eta * d) * d / d0 * g[i]
        for i in range(len(x)):
            if decoupled_wd: x[i] = x[i] * (1 - weight_decay * eta * d)
            x[i] = x[i] - eta * d * m[i] / (torch.sqrt(v[i]) + d * eps)
        d_hat = d_coef * r / sum(float(si.abs().sum()) for si in s)
        if d == d0: d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * growth_rate)
        out.append(([t.clone() for t in x], d))
    return out


def dadapt_adam_reference(thetas, grad_fn, steps, lr=1.0, betas=(0.9, 0.999), d0=1e-6, growth_rate=math.inf,
                          weight_decay=0.0, decoupled_wd=False, bias_correction=False, eps=1e-8, maximize=False):
    "Defazio & Mishchenko's Adam with D-Adaptation, version 3 of the authors' code"
    b1, b2 = betas
    sb2 = math.sqrt(b2)
    x = [t.clone() for t in thetas]
    m = [torch.zeros_like(t) for t in thetas]
    v = [torch.zeros_like(t) for t in thetas]
    s = [torch.zeros_like(t) for t in thetas]
    r, d, out = 0.0, d0, []
    for k in range(1, steps + 1):
        g = grad_fn(x, k)
        if maximize: g = [-a for a in g]
        if not decoupled_wd: g = [a + weight_decay * b for a, b in zip(g, x)]
        lam = lr * d * (math.sqrt(1 - b2 ** k) / (1 - b1 ** k) if bias_correction else 1.0)
        inner = sum(float((gi * si / (torch.sqrt(vi) + eps)).sum()) for gi, si, vi in zip(g, s, v))
        for i in range(len(x)):
            m[i] = b1 * m[i] + (1 - b1) * lam * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            s[i] = sb2 * s[i] + (1 - sb2) * lam * g[i]
        r = sb2 * r + (1 - sb2) * lam * inner
        for i in range(len(x)):
            if decoupled_wd: x[i] = x[i] * (1 - weight_decay * lam)
            x[i] = x[i] - m[i] / (torch.sqrt(v[i]) + eps)
        if lr > 0: d = max(d, min(r / ((1 - sb2) * sum(float(si.abs().sum()) for si in s)), growth_rate * d))
        out.append(([t.clone() for t in x], d))
    return out


def dadapt_sgd_reference(thetas, grad_fn, steps, lr=1.0, momentum=0.9, d0=1e-6, growth_rate=math.inf,
                         weight_decay=0.0, decoupled_wd=False, maximize=False):
    "Defazio & Mishchenko's dual averaging with D-Adaptation and momentum (the authors' SGD, version 3)"
    x0 = [t.clone() for t in thetas]
    x = [t.clone() for t in thetas]
    s = [torch.zeros_like(t) for t in thetas]
    total, d, g0, out = 0.0, d0, None, []
    for k in range(1, steps + 1):
        g = grad_fn(x, k)
        if maximize: g = [-a for a in g]
        if not decoupled_wd: g = [a + weight_decay * b for a, b in zip(g, x)]
        if g0 is None: g0 = math.sqrt(sum(float((gi ** 2).sum()) for gi in g))
        lam = lr * d / g0
        total += lam * sum(float((gi * si).sum()) for gi, si in zip(g, s))
        for i in range(len(x)):
            s[i] = s[i] + lam * g[i]
            if decoupled_wd: x[i] = x[i] * (1 - weight_decay * lam)
            x[i] = momentum * x[i] + (1 - momentum) * (x0[i] - s[i])
        if lr > 0: d = max(d, min(2 * total / math.sqrt(sum(float((si ** 2).sum()) for si in s)), growth_rate * d))
        out.append(([t.clone() for t in x], d))
    return out


# %% Harness: one group of mixed shapes, noisy quadratic gradients

def problem(seed=0, steps=STEPS, shapes=SHAPES, dtype=torch.float64, centre=0.0):
    "Start weights and g_t(θ) = θ − centre + ξ_t, fixed by `seed`"
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    noise = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]
    def grad_fn(thetas, t): return [th - centre + xi for th, xi in zip(thetas, noise[t - 1])]
    return start, grad_fn


def run(make, steps=STEPS, seed=0, dtype=torch.float64, **kw):
    "[(weights, d)] after every step of `make(params)`"
    start, grad_fn = problem(seed, steps, dtype=dtype, **kw)
    ps = [t.clone().requires_grad_() for t in start]
    opt, out = make(ps), []
    for t in range(1, steps + 1):
        for p, g in zip(ps, grad_fn([p.detach() for p in ps], t)): p.grad = g
        opt.step()
        out.append(([p.detach().clone() for p in ps], opt.param_groups[0]['d']))
    return out, opt, ps


def deviation(a, b):
    "(largest |θ_a − θ_b| over all steps and weights, largest relative |d_a − d_b|)"
    weights = max(float((x - y).abs().max()) for (xa, _), (xb, _) in zip(a, b, strict=True) for x, y in zip(xa, xb))
    return weights, max(abs(float(da) - float(db)) / float(db) for (_, da), (_, db) in zip(a, b))


REFERENCES = [
    (Prodigy, prodigy_reference, {}),
    (Prodigy, prodigy_reference, dict(weight_decay=0.2, decoupled_wd=False)),
    (Prodigy, prodigy_reference, dict(weight_decay=0.2, bias_correction=True, growth_rate=1.3)),
    (Prodigy, prodigy_reference, dict(beta3=0.95, d_coef=0.7, safeguard_warmup=True, betas=(0.8, 0.99))),
    (Prodigy, prodigy_reference, dict(lr=0.3, d0=1e-3, eps=1e-3)),
    (DAdaptAdam, dadapt_adam_reference, {}),
    (DAdaptAdam, dadapt_adam_reference, dict(weight_decay=0.2, bias_correction=True)),
    (DAdaptAdam, dadapt_adam_reference, dict(weight_decay=0.2, decoupled_wd=True, growth_rate=1.2, betas=(0.8, 0.99))),
    (DAdaptSGD, dadapt_sgd_reference, {}),
    (DAdaptSGD, dadapt_sgd_reference, dict(weight_decay=0.2, momentum=0.5, growth_rate=1.3)),
    (DAdaptSGD, dadapt_sgd_reference, dict(weight_decay=0.2, decoupled_wd=True, lr=0.5, d0=1e-4)),
]


@pytest.mark.parametrize('cls,reference,hypers', REFERENCES,
                         ids=[f'{c.__name__}-{"-".join(f"{k}={v}" for k, v in h.items()) or "defaults"}' for c, _, h in REFERENCES])
def test_matches_float64_transcription(cls, reference, hypers):
    "60 steps in float64 on one group of four tensors: the weights to 1e-9 (measured: ~1e-15), d to 1e-9 relative"
    ours, _, _ = run(lambda ps: cls(ps, **hypers))
    start, grad_fn = problem()
    theirs = reference(start, grad_fn, STEPS, **hypers)
    dev, d_dev = deviation(ours, theirs)
    assert dev < 1e-9 and d_dev < 1e-9, f'{cls.__name__} {hypers}: weights {dev:.2e}, d {d_dev:.2e}'
    assert ours[-1][1] > 100 * ours[0][1], f'{cls.__name__} {hypers}: d hardly moved, the check is empty'


def test_maximize_is_descent_on_the_negated_gradient():
    "maximize=True on gradients -g gives the trajectory of minimising with g, bit for bit"
    for cls in (Prodigy, DAdaptAdam, DAdaptSGD):
        start, grad_fn = problem()
        runs = []
        for maximize in (False, True):
            ps = [t.clone().requires_grad_() for t in start]
            opt = cls(ps, maximize=maximize)
            for t in range(1, 31):
                for p, g in zip(ps, grad_fn([p.detach() for p in ps], t)): p.grad = -g if maximize else g
                opt.step()
            runs.append([p.detach() for p in ps])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), cls.__name__


# %% The estimate d

@pytest.mark.parametrize('cls', [Prodigy, DAdaptAdam, DAdaptSGD], ids=lambda c: c.__name__)
@pytest.mark.parametrize('growth_rate', [math.inf, 1.05])
def test_d_starts_at_d0_never_falls_and_is_growth_bounded(cls, growth_rate):
    p = torch.zeros(3, requires_grad=True)
    test_opt = cls([p], d0=3e-5, growth_rate=growth_rate)
    assert test_opt.param_groups[0]['d'] == 3e-5
    path, _, _ = run(lambda ps: cls(ps, growth_rate=growth_rate), steps=200, centre=3.0)
    ds = [1e-6] + [d for _, d in path]
    assert ds[-1] > 1e3 * ds[0], f'{cls.__name__}: d did not grow ({ds[-1]:.2e})'
    assert all(b >= a for a, b in zip(ds, ds[1:])), f'{cls.__name__}: d fell'
    if math.isfinite(growth_rate):
        # Prodigy's first move off d0 is not capped (as in the authors' code); D-Adaptation's is
        first = next(i for i, d in enumerate(ds) if d != ds[0]) if cls is Prodigy else 1
        ratios = [b / a for a, b in zip(ds[first:], ds[first + 1:])]
        assert max(ratios) <= growth_rate * (1 + 1e-12), f'{cls.__name__}: grew by {max(ratios):.4f} in one step'
        assert max(ratios) > 1.04, f'{cls.__name__}: the cap never bound; the test is empty'


@pytest.mark.parametrize('cls', [Prodigy, DAdaptAdam, DAdaptSGD], ids=lambda c: c.__name__)
def test_each_group_has_its_own_d(cls):
    "Two groups, different d0: each estimate starts at its own d0 and moves on its own; a group added later too"
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(s, generator=gen).requires_grad_() for s in ((5,), (3, 4), (2,)))
    opt = cls([{'params': [a]}, {'params': [b], 'd0': 1e-3}])
    assert [g['d'] for g in opt.param_groups] == [1e-6, 1e-3]
    for t in range(20):
        for p in (a, b): p.grad = p.detach() - 2.0
        opt.step()
    opt.add_param_group({'params': [c], 'd0': 1e-5})
    assert opt.param_groups[2]['d'] == 1e-5
    for t in range(20):
        for p in (a, b, c): p.grad = p.detach() - 2.0
        opt.step()
    d = [g['d'] for g in opt.param_groups]
    assert d[0] > 1e-6 and d[1] > 1e-3 and d[2] > 1e-5 and len(set(d)) == 3, d


@pytest.mark.parametrize('cls', [Prodigy, DAdaptAdam, DAdaptSGD], ids=lambda c: c.__name__)
@pytest.mark.parametrize('roundtrip', ['deepcopy', 'torch.save'])
def test_resume_is_bit_exact_including_d(cls, roundtrip):
    "N steps, save, load into a fresh optimizer, M steps == N + M steps: weights, state and every group number"
    hypers = dict(weight_decay=0.1, growth_rate=1.5)
    full, opt_full, ps_full = run(lambda ps: cls(ps, **hypers), steps=30)
    start, grad_fn = problem(steps=30)
    ps = [t.clone().requires_grad_() for t in start]
    opt = cls(ps, **hypers)
    for t in range(1, 16):
        for p, g in zip(ps, grad_fn([p.detach() for p in ps], t)): p.grad = g
        opt.step()
    saved = opt.state_dict()
    if roundtrip == 'deepcopy': saved = copy.deepcopy(saved)
    else:
        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
    d_saved = saved['param_groups'][0]['d']
    assert d_saved > 1e-6
    ps = [p.detach().clone().requires_grad_() for p in ps]
    fresh = cls(ps, **hypers)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]['d'] == d_saved
    for t in range(16, 31):
        for p, g in zip(ps, grad_fn([p.detach() for p in ps], t)): p.grad = g
        fresh.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ps_full))
    numbers = lambda o: {k: v for k, v in o.param_groups[0].items() if k != 'params'}
    assert numbers(fresh) == numbers(opt_full)
    for p, q in zip(ps, ps_full):
        for k, v in opt_full.state[q].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(fresh.state[p][k])), (cls.__name__, k)


def test_l2_decay_joins_the_gradient_before_every_statistic():
    "With decoupled_wd=False, training with decay λ on g is training without decay on g + λθ (float64, to 1e-12)"
    for cls in (Prodigy, DAdaptAdam, DAdaptSGD):
        start, grad_fn = problem()
        runs = []
        for decayed in (True, False):
            ps = [t.clone().requires_grad_() for t in start]
            opt = cls(ps, weight_decay=0.3 if decayed else 0.0, decoupled_wd=False)
            for t in range(1, 31):
                gs = grad_fn([p.detach() for p in ps], t)
                for p, g in zip(ps, gs): p.grad = g if decayed else g + 0.3 * p.detach()
                opt.step()
            runs.append(([p.detach() for p in ps], opt.param_groups[0]['d']))
        (a, da), (b, db) = runs   # to rounding: g.add(θ, alpha=λ) and g + λθ may round differently
        assert abs(da - db) <= 1e-12 * db and all(torch.allclose(x, y, rtol=0, atol=1e-12) for x, y in zip(a, b)), cls.__name__


# %% pytorch-optimizer, where it follows the algorithm

PEERS = {
    'DAdaptAdam': (lambda ps: DAdaptAdam(ps), lambda ps: PO.DAdaptAdam(ps)),
    'DAdaptAdam-L2-bias': (lambda ps: DAdaptAdam(ps, weight_decay=0.1, bias_correction=True),
                           lambda ps: PO.DAdaptAdam(ps, weight_decay=0.1, bias_correction=True)),
    'DAdaptAdam-decoupled-growth': (lambda ps: DAdaptAdam(ps, weight_decay=0.1, decoupled_wd=True, growth_rate=1.05),
                                    lambda ps: PO.DAdaptAdam(ps, weight_decay=0.1, weight_decouple=True, growth_rate=1.05)),
    'DAdaptSGD': (lambda ps: DAdaptSGD(ps), lambda ps: PO.DAdaptSGD(ps)),
    'DAdaptSGD-decoupled': (lambda ps: DAdaptSGD(ps, weight_decay=0.1, decoupled_wd=True),
                            lambda ps: PO.DAdaptSGD(ps, weight_decay=0.1, weight_decouple=True)),
    'Prodigy-eps0': (lambda ps: Prodigy(ps, eps=0.0), lambda ps: PO.Prodigy(ps, eps=0.0)),
    'Prodigy-decoupled-bias-growth': (lambda ps: Prodigy(ps, weight_decay=0.1, bias_correction=True, growth_rate=1.02),
                                      lambda ps: PO.Prodigy(ps, weight_decay=0.1, bias_correction=True, growth_rate=1.02)),
    'Prodigy-safeguard-beta3': (lambda ps: Prodigy(ps, safeguard_warmup=True, beta3=0.9, d_coef=0.5),
                                lambda ps: PO.Prodigy(ps, safeguard_warmup=True, beta3=0.9, d_coef=0.5)),
    'Prodigy-defaults': (lambda ps: Prodigy(ps), lambda ps: PO.Prodigy(ps)),
}


@pytest.mark.parametrize('label', list(PEERS))
def test_agrees_with_pytorch_optimizer(label):
    """100 steps in float64, one group. Margin 2e-5 on the weights and 1e-5 on d: pytorch-optimizer adds its group sums
    into float32 tensors (a relative ~1e-7 in its d; measured up to 1.2e-6 on the weights), and its Prodigy adds
    d_{k+1}·eps to sqrt(v) where the paper adds d_k·eps (measured 2.9e-6 with the default eps, 8.6e-8 with eps=0)"""
    ours, theirs = PEERS[label]
    (a, _, _), (b, _, _) = run(ours, steps=100), run(theirs, steps=100)
    dev, d_dev = deviation(a, b)
    assert dev < 2e-5 and d_dev < 1e-5, f'{label}: weights {dev:.2e}, d {d_dev:.2e}'
    assert a[-1][1] > 5 * a[0][1], f'{label}: d hardly moved, the comparison is empty'


def test_pytorch_optimizer_prodigy_l2_decay_does_nothing():
    "The peer's Prodigy with weight_decouple=False equals no decay bit for bit; ours follows the transcription"
    (peer_l2, _, _), (peer_none, _, _) = (run(lambda ps: PO.Prodigy(ps, weight_decay=0.5, weight_decouple=False)),
                                          run(lambda ps: PO.Prodigy(ps)))
    if peer_is('pytorch_optimizer'):
        assert all(torch.equal(x, y) for (xs, _), (ys, _) in zip(peer_l2, peer_none) for x, y in zip(xs, ys))
    ours, _, _ = run(lambda ps: Prodigy(ps, weight_decay=0.5, decoupled_wd=False))
    start, grad_fn = problem()
    dev, _ = deviation(ours, prodigy_reference(start, grad_fn, STEPS, weight_decay=0.5, decoupled_wd=False))
    gap, _ = deviation(ours, peer_l2)
    assert dev < 1e-9, dev
    if peer_is('pytorch_optimizer'): assert gap > 0.1, gap


# %% float32, low precision, degenerate input

@pytest.mark.parametrize('cls', [Prodigy, DAdaptAdam, DAdaptSGD], ids=lambda c: c.__name__)
def test_float32_tracks_float64(cls):
    """The same 60 steps in float32 stay near float64. Prodigy's margin is wider (2e-2; measured 5.2e-3 on the weights,
    4.5e-3 on d): its first numerators ⟨g, θ_0 − θ⟩ are measured on float32 weights that have moved by d0 = 1e-6, a few
    ulps, so they carry a rounding error of several percent that d keeps. D-Adaptation's: 1e-3"""
    (a, _, _), (b, _, _) = run(lambda ps: cls(ps)), run(lambda ps: cls(ps), dtype=torch.float32)
    dev, d_dev = deviation(a, b)
    margin = 2e-2 if cls is Prodigy else 1e-3
    assert dev < margin and d_dev < margin, f'{cls.__name__}: weights {dev:.2e}, d {d_dev:.2e}'


@pytest.mark.parametrize('cls', [Prodigy, DAdaptAdam, DAdaptSGD], ids=lambda c: c.__name__)
def test_zero_gradients_leave_d_and_weights(cls):
    "All-zero gradients: nothing to estimate from; d stays d0, the weights stay, nothing becomes nan"
    ps = [torch.randn(s).requires_grad_() for s in ((3,), (2, 2))]
    before = [p.detach().clone() for p in ps]
    opt = cls(ps)
    for _ in range(3):
        for p in ps: p.grad = torch.zeros_like(p)
        opt.step()
    assert opt.param_groups[0]['d'] == 1e-6
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
