"""AdaFactor and CAME (chapter 72) against float64 transcriptions of their papers' algorithms and against
pytorch-optimizer 4.1.

The references follow Shazeer & Stern 2018 (Algorithms 4 and 5: relative step, parameter-RMS scaling, β̂2_t = 1 - t^c,
row/column *sums* with V̂ = R C / 1ᵀR formed explicitly, update clipping) and Luo et al. 2023 (Algorithm 1; tensors
below 2-D step by η m_t, as the authors' code does), as plain loops in float64; they run on a vector, a matrix and a
3-D tensor for 50 steps. The peer agrees with the papers once its AdaFactor keeps float32 momentum and its cap on
β̂2_t is lifted; its defaults (bf16 momentum, the cap) are asserted to differ.
"""
from __future__ import annotations
import copy, math

import pytest
import torch

from optim_lab import load_optimizer
from optim_lab.checks import reference_check, noisy_quadratic, run_optimizer, max_deviation
from histories import run, assert_close_histories, deviation

AdaFactor, CAME = load_optimizer('AdaFactor'), load_optimizer('CAME')
SHAPES = ((7,), (4, 5), (3, 2, 4))
REF_TOL = 1e-10   # float64 on both sides: the orders of summation differ (sums vs means), nothing else


# %% The papers' algorithms in float64


def adafactor_reference(theta, grad_fn, steps, lr=1e-3, betas=(0.9, 0.999), decay_rate=-0.8, weight_decay=0.0,
                        decoupled_wd=True, clip_threshold=1.0, scale_parameter=True, relative_step=True,
                        warmup_init=False, eps1=1e-30, eps2=1e-3, maximize=False):
    beta1, beta2 = betas
    matrix = theta.dim() >= 2
    R = torch.zeros(theta.shape[:-1], dtype=theta.dtype) if matrix else None
    C = torch.zeros(theta.shape[:-2] + theta.shape[-1:], dtype=theta.dtype) if matrix else None
    V = torch.zeros_like(theta)
    m = torch.zeros_like(theta)
    iterates = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        if maximize: g = -g
        rho = (min(1e-6 * t if warmup_init else 1e-2, 1 / math.sqrt(t))) if relative_step else lr
        alpha = max(eps2, math.sqrt((theta ** 2).mean().item())) * rho if scale_parameter else rho
        if decoupled_wd: theta = theta * (1 - alpha * weight_decay)
        else: g = g + weight_decay * theta
        b2 = 1 - t ** decay_rate if decay_rate is not None else beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2 ** t)
        sq = g * g + eps1
        if matrix:   # row and column sums, V = R C / (1^T R)
            R = b2 * R + (1 - b2) * sq.sum(-1)
            C = b2 * C + (1 - b2) * sq.sum(-2)
            V = R.unsqueeze(-1) * C.unsqueeze(-2) / R.sum(-1)[..., None, None]
        else:
            V = b2 * V + (1 - b2) * sq
        U = g / torch.sqrt(V)
        U = U / max(1.0, math.sqrt((U ** 2).mean().item()) / clip_threshold)
        s = alpha * U
        if beta1 is not None:
            m = beta1 * m + (1 - beta1) * s
            s = m
        theta = theta - s
        iterates.append(theta)
    return iterates

def came_reference(theta, grad_fn, steps, lr=2e-4, betas=(0.9, 0.999, 0.9999), weight_decay=0.0, decoupled_wd=True,
                   clip_threshold=1.0, eps1=1e-30, eps2=1e-16, maximize=False):
    beta1, beta2, beta3 = betas
    matrix = theta.dim() >= 2
    def zeros_row(): return torch.zeros(theta.shape[:-1], dtype=theta.dtype)
    def zeros_col(): return torch.zeros(theta.shape[:-2] + theta.shape[-1:], dtype=theta.dtype)
    def rank1(R, C): return R.unsqueeze(-1) * C.unsqueeze(-2) / R.sum(-1)[..., None, None]
    if matrix: r, c, Rr, Cr = zeros_row(), zeros_col(), zeros_row(), zeros_col()
    v = torch.zeros_like(theta)
    m = torch.zeros_like(theta)
    iterates = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        if maximize: g = -g
        if decoupled_wd: theta = theta * (1 - lr * weight_decay)
        else: g = g + weight_decay * theta
        sq = g * g + eps1
        if matrix:
            r = beta2 * r + (1 - beta2) * sq.sum(-1)
            c = beta2 * c + (1 - beta2) * sq.sum(-2)
            v = rank1(r, c)
        else: v = beta2 * v + (1 - beta2) * sq
        u = g / torch.sqrt(v)
        u = u / max(1.0, math.sqrt((u ** 2).mean().item()) / clip_threshold)
        m = beta1 * m + (1 - beta1) * u
        if matrix:
            U = (u - m) ** 2 + eps2
            Rr = beta3 * Rr + (1 - beta3) * U.sum(-1)
            Cr = beta3 * Cr + (1 - beta3) * U.sum(-2)
            theta = theta - lr * m / torch.sqrt(rank1(Rr, Cr))
        else:
            theta = theta - lr * m
        iterates.append(theta)
    return iterates


ADAFACTOR_SETTINGS = [
    dict(),                                                      # the paper's defaults: relative step, RMS scaling
    dict(betas=(None, 0.999)),                                   # no momentum
    dict(weight_decay=0.1),                                      # decoupled, with α_t
    dict(warmup_init=True, eps2=0.5),
    dict(relative_step=False, lr=3e-2, scale_parameter=False, decay_rate=None, betas=(0.8, 0.99)),  # constant β2
    dict(relative_step=False, lr=5e-2, weight_decay=0.3, decoupled_wd=False, clip_threshold=0.5, decay_rate=-0.5,
         maximize=True),
    dict(relative_step=False, lr=2e-2, clip_threshold=0.1, eps1=1e-3),
]

@pytest.mark.parametrize('hypers', ADAFACTOR_SETTINGS, ids=str)
def test_adafactor_matches_the_paper(hypers):
    dev = reference_check(AdaFactor, adafactor_reference, steps=50, shapes=SHAPES, **hypers)
    assert dev < REF_TOL, f'AdaFactor{hypers}: {dev:.3e}'


CAME_SETTINGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.9, 0.99), weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.2, decoupled_wd=False, clip_threshold=0.3, maximize=True),
    dict(lr=2e-4),
    dict(lr=1e-2, eps1=1e-4, eps2=1e-3),
]

@pytest.mark.parametrize('hypers', CAME_SETTINGS, ids=str)
def test_came_matches_the_paper(hypers):
    dev = reference_check(CAME, came_reference, steps=50, shapes=SHAPES, **hypers)
    assert dev < REF_TOL, f'CAME{hypers}: {dev:.3e}'


def test_the_references_tell_right_from_wrong():
    "A wrong decay (a capped β̂2, as the peer's) is caught by the same check"
    def capped(theta, grad_fn, steps, **kw):   # β̂2 never above 0.5: parts from step 3 on
        return adafactor_reference(theta, grad_fn, steps, decay_rate=None, betas=(0.9, 0.5), **kw)
    assert reference_check(AdaFactor, capped, steps=50, shapes=SHAPES) > 1e-4


# %% pytorch-optimizer

po = pytest.importorskip('pytorch_optimizer')

def peer_adafactor(params, momentum_dtype=torch.float32, cap=1.0, **hypers):
    "The peer's AdaFactor as the paper has it: float32 momentum, no cap on β̂2 (its constructor refuses betas[1]=1)"
    opt = po.AdaFactor(params, momentum_dtype=momentum_dtype, **hypers)
    for group in opt.param_groups: group['betas'] = (group['betas'][0], cap)
    return opt

def peer_kwargs(ours: dict) -> dict:
    theirs = dict(ours)
    if 'decoupled_wd' in theirs: theirs['weight_decouple'] = theirs.pop('decoupled_wd')
    return theirs

ADAFACTOR_PEER = [
    dict(),
    dict(betas=(None, 0.999)),
    dict(weight_decay=0.1, scale_parameter=False),
    dict(relative_step=False, lr=1e-2, weight_decay=0.2, decoupled_wd=False, clip_threshold=0.5),
    dict(warmup_init=True, decay_rate=-0.6, maximize=True),
]

@pytest.mark.parametrize('hypers', ADAFACTOR_PEER, ids=str)
def test_adafactor_vs_pytorch_optimizer(hypers):
    kw = peer_kwargs(hypers)
    maximize = kw.pop('maximize', False)
    def theirs(ps):
        opt = peer_adafactor(ps, **kw)
        opt.maximize = maximize
        return opt
    ours_h, theirs_h = run(lambda ps: AdaFactor(ps, **hypers)), run(theirs)
    if hypers.get('warmup_init'):   # steps of 1e-6 t: too small for the "moved" guard; compare directly
        assert deviation(ours_h, theirs_h) < 1e-6
    else: assert_close_histories(ours_h, theirs_h, f'AdaFactor{hypers}')


CAME_PEER = [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.9, 0.99), weight_decay=0.1),
             dict(lr=5e-3, weight_decay=0.2, decoupled_wd=False, clip_threshold=0.3)]

@pytest.mark.parametrize('hypers', CAME_PEER, ids=str)
def test_came_vs_pytorch_optimizer(hypers):
    assert_close_histories(run(lambda ps: CAME(ps, **hypers)), run(lambda ps: po.CAME(ps, **peer_kwargs(hypers))),
                           f'CAME{hypers}')


def test_peer_bf16_momentum_differs():
    "The peer's default momentum_dtype=bfloat16 rounds m_t to 8 mantissa bits: 100 steps part by far more than float32 noise"
    right = deviation(run(lambda ps: AdaFactor(ps)), run(lambda ps: peer_adafactor(ps)))
    bf16 = deviation(run(lambda ps: AdaFactor(ps)), run(lambda ps: peer_adafactor(ps, momentum_dtype=torch.bfloat16)))
    assert right < 1e-6 and bf16 > 1e-4, (right, bf16)


def test_peer_cap_on_beta2_differs():
    "The peer's β̂2_t = min(betas[1], 1 - t^c): with betas[1]=0.99 it binds from step 317 (1 - 317^-0.8 > 0.99)"
    theta0, grad_fn = noisy_quadratic((4, 5), 600, seed=0, dtype=torch.float32)
    ours = run_optimizer(lambda ps: AdaFactor(ps, betas=(0.9, 0.99)), theta0, grad_fn, 600)
    capped = run_optimizer(lambda ps: peer_adafactor(ps, cap=0.99, betas=(0.9, 0.99)), theta0, grad_fn, 600)
    before, after = max_deviation(ours[:316], capped[:316]), max_deviation(ours, capped)
    assert before < 1e-6 and after > 1e-4, (before, after)


# %% Resume, momentum switched on later, compile with the relative step

def _steps(opt, ps, t0, t1):
    for t in range(t0, t1):
        g = torch.Generator().manual_seed(t)
        for p in ps: p.grad = torch.sin(3 * p.detach()) + 0.3 * torch.randn(p.shape, generator=g)
        opt.step()

@pytest.mark.parametrize('make', [lambda ps: AdaFactor(ps), lambda ps: AdaFactor(ps, betas=(None, 0.999), weight_decay=0.1),
                                  lambda ps: AdaFactor(ps, decay_rate=None, relative_step=False, lr=1e-2),
                                  lambda ps: CAME(ps, lr=1e-2, weight_decay=0.1)],
                         ids=['adafactor', 'adafactor-no-momentum', 'adafactor-constant-beta2', 'came'])
def test_resume_is_bit_exact(make):
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    a = [x.clone().requires_grad_() for x in start]
    opt_a = make(a)
    _steps(opt_a, a, 0, 20)
    b = [x.clone().requires_grad_() for x in start]
    opt_b = make(b)
    _steps(opt_b, b, 0, 8)
    saved = copy.deepcopy(opt_b.state_dict())
    c = [x.detach().clone().requires_grad_() for x in b]
    opt_c = make(c)
    opt_c.load_state_dict(saved)
    _steps(opt_c, c, 8, 20)
    for x, y in zip(a, c): assert torch.equal(x, y)


def test_momentum_switched_on_later():
    "betas[0]=None keeps no momentum buffer; a β1 set later (fastai's mom) creates it at zero, as a fresh m_0"
    p = torch.randn(4, 5, requires_grad=True)
    opt = AdaFactor([p], betas=(None, 0.999))
    _steps(opt, [p], 0, 2)
    assert 'exp_avg' not in opt.state[p]
    before = p.detach().clone()
    opt.param_groups[0]['betas'] = (0.9, 0.999)
    _steps(opt, [p], 2, 3)
    m = opt.state[p]['exp_avg']
    torch.testing.assert_close(p.detach(), before - m)                        # X_t = X_(t-1) - m_t
    assert m.abs().max() > 0


def test_compiled_relative_step_matches_eager():
    "The compile contract runs AdaFactor with relative_step=False; here the default relative step and RMS scaling, through the step tensor"
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    out = []
    for compile in (False, True):
        ps = [x.clone().requires_grad_() for x in start]
        opt = AdaFactor(ps, weight_decay=0.1, compile=compile)
        _steps(opt, ps, 0, 20)
        out.append(ps)
    for x, y in zip(*out): torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
