"""FishMonger, FARMSCrop and FARMSCropV2 (Clybius/Personalized-Optimizers at bfa2fdd): against float64 transcriptions
of upstream's step rules and against upstream's own classes, defaults parsed from upstream's source, `p.grad`
untouched, a small regression MLP trained, bf16 weights with fp32 state."""
from __future__ import annotations
import ast
import inspect
import math
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch
from torch import nn

from optim_lab.checks import noisy_quadratic, reference_check, run_optimizer, max_deviation
from optim_lab.optimizers.fishmonger import FishMonger
from optim_lab.optimizers.farmscrop import FARMSCrop, FARMSCropV2
from clybius_upstream import upstream_class, upstream_source

SHAPES = ((7,), (4, 5), (3, 2, 2, 2))


# %% float64 transcriptions of upstream's FishMonger.py, FARMSCrop.py, FARMSCropV2.py (commit bfa2fdd), from the equations

def _centred(x, kappa):
    return x - kappa * x.mean(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x


def fishmonger_reference(theta, grad_fn, steps, lr=1e-3, betas=(0.9, 0.99, 0.999), eps=1e-8, weight_decay=0.0,
                         clip=1.0, centralization=1.0, diff_amp=1.0, diff_amp_beta=0.999):
    b1, b2, b3 = betas
    c = clip if clip > 0 else 1.0
    m, mu, w, e = (torch.zeros_like(theta) for _ in range(4))
    F = torch.ones_like(theta)
    def clipped(x): return x / (max(1.0, x.pow(2).mean().sqrt().item() + eps) / c)
    out, g_prev = [], None
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        g_prev = g if g_prev is None else g_prev
        e = diff_amp_beta * e + (1 - diff_amp_beta) * (g - g_prev)
        g_prev = g
        m = b1 * m + (1 - b1) * g
        bh = (b2 ** t - b2) / (b2 ** t - 1)
        F = bh * F + (1 - bh) * m * m
        D = F.sqrt() + eps
        mu = b1 * mu + (1 - b1) * clipped(m / D)
        bc = (b3 ** t - b3) / (b3 ** t - 1)
        w = bc * w + (1 - bc) * mu * mu
        S = w.sqrt() + eps
        s = clipped(g / D / S) + weight_decay * clipped(theta / D / S)
        if diff_amp: s = s - diff_amp * clipped(e / D / S)
        if centralization != 0: s = _centred(s, centralization)
        theta = theta - lr / (1 - b1 ** t) * s
        out.append(theta)
    return out


def farmscrop_reference(theta, grad_fn, steps, lr=1e-4, betas=(0.999, 0.9999), eps=1e-8, weight_decay=1e-6,
                        centralization=1.0, diff_mult=1.0, momentum_beta=0.9999, momentum_amp=5.0):
    b1, b2 = betas
    Q, F, m, g_prev = torch.ones_like(theta), torch.ones_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    def clipped(x): return x / max(1.0, x.pow(2).mean().sqrt().item())
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        d = diff_mult * (g - g_prev)
        g_prev = g
        Q = b1 * Q + (1 - b1) * d * d
        R = Q.sqrt() + eps
        a = clipped(g / R)
        gamma = math.sqrt((b2 ** t - b2) / (b2 ** t - 1))
        F = gamma * F + (1 - gamma) * a * a
        D = F.sqrt() + eps
        n = clipped(g / D * R)
        if centralization != 0: n = _centred(n, centralization)
        m = momentum_beta * m + (1 - momentum_beta) * n
        theta = theta - lr * (n + momentum_amp * m + weight_decay * clipped(theta / D * R))
        out.append(theta)
    return out


def farmscrop_v2_reference(theta, grad_fn, steps, lr=1e-4, betas=(0.999, 0.9999), eps=1e-6, weight_decay=0.0,
                           centralization=0.0, diff_mult=1.0, momentum_beta=0.9999, momentum_lambda=0.25, clip=1.0):
    "Upstream's rule including its aliasing of p.grad: n divides by R twice and the stored previous gradient is a_t"
    b1, b2 = betas
    Q, F, m = torch.ones_like(theta), torch.ones_like(theta), torch.zeros_like(theta)
    def clipped(x): return x / (max(clip, x.pow(2).mean().sqrt().item()) / clip)
    out, a_prev = [], None
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        lam = t ** 0.25
        R = 1.0
        if diff_mult > 0:
            a_prev = g if a_prev is None else a_prev
            d = clipped(diff_mult * (g - a_prev))
            R = Q.sqrt().clamp(min=eps)
            Q = (b1 * Q + (1 - b1) * d * d).clamp(-lam, lam)
        a = clipped(g / R)
        D = F.sqrt().clamp(min=eps)
        n = clipped(a / D / R)
        s = n + t ** momentum_lambda * m
        if centralization != 0: s = _centred(s, centralization)
        theta = theta - lr * weight_decay * clipped(theta / D / R) - lr * s
        gamma = math.sqrt((b2 ** t - b2) / (b2 ** t - 1))
        F = (gamma * F + (1 - gamma) * a * a).clamp(-lam, lam)
        m = momentum_beta * m + (1 - momentum_beta) * n
        a_prev = a
        out.append(theta)
    return out


CASES = {
    FishMonger: (fishmonger_reference,
                 dict(lr=3e-2, betas=(0.8, 0.9, 0.99), weight_decay=0.05, clip=0.5, centralization=0.5, diff_amp=2.0,
                      diff_amp_beta=0.9)),
    FARMSCrop: (farmscrop_reference,
                dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, centralization=0.5, diff_mult=2.0,
                     momentum_beta=0.9, momentum_amp=2.0)),
    FARMSCropV2: (farmscrop_v2_reference,
                  dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, centralization=0.5, diff_mult=2.0,
                       momentum_beta=0.9, momentum_lambda=0.5, clip=0.5)),
}
CLASSES = list(CASES)
EXTRA = {FishMonger: dict(lr=1e-2, clip=0.0, centralization=0.0, diff_amp=0.0),
         FARMSCropV2: dict(lr=1e-2, diff_mult=0.0, centralization=1.0)}   # the switched-off branches
SETTINGS = [(cls, 'defaults', {}) for cls in CLASSES] + [(cls, 'other', CASES[cls][1]) for cls in CLASSES] + \
           [(cls, 'switched_off', h) for cls, h in EXTRA.items()]
IDS = [f'{cls.__name__}-{label}' for cls, label, _ in SETTINGS]


@pytest.mark.parametrize('cls,label,hypers', SETTINGS, ids=IDS)
def test_vs_upstream_rule(cls, label, hypers):
    dev = reference_check(cls, CASES[cls][0], steps=60, shapes=SHAPES, noise=3.0, **hypers)
    assert dev < 1e-12, dev


def test_references_move():
    "The transcriptions are not vacuous: with the defaults, 60 steps move the weights"
    for cls, (ref, _) in CASES.items():
        theta0, grad_fn = noisy_quadratic((4, 5), 60, 0, 3.0)
        assert (ref(theta0.clone(), grad_fn, 60)[-1] - theta0).abs().max() > 1e-3, cls.__name__


# %% against upstream's own source (read with git from a copy of upstream, see clybius_upstream.py; skipped without one)

def _upstream_defaults(name: str) -> dict:
    "The keyword defaults of upstream's `__init__`, parsed from its source text (not imported)"
    tree = ast.parse(upstream_source(f'{name}.py'))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == '__init__')
    names = [a.arg for a in init.args.args][-len(init.args.defaults):]
    return {k: ast.literal_eval(v) for k, v in zip(names, init.args.defaults)}


@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_defaults_equal_upstream(cls):
    theirs = _upstream_defaults(cls.__name__)
    ours = {k: v.default for k, v in inspect.signature(cls).parameters.items() if v.default is not inspect.Parameter.empty}
    assert len(theirs) >= 8, theirs
    for k, v in theirs.items():
        assert k in ours, f'{cls.__name__}: upstream hyperparameter {k} missing'
        assert ours[k] == v and type(ours[k]) == type(v), f'{cls.__name__}.{k}: ours {ours[k]!r}, upstream {v!r}'
    assert set(ours) - set(theirs) == {'maximize'}, set(ours) - set(theirs)


@pytest.mark.parametrize('cls,label,hypers', SETTINGS, ids=IDS)
def test_vs_upstream_class(cls, label, hypers):
    "Upstream's own class, executed from its source at bfa2fdd, beside ours in float64 (60 steps)"
    theirs_cls, worst = upstream_class(f'{cls.__name__}.py', cls.__name__), 0.0
    for i, shape in enumerate(SHAPES):
        theta0, grad_fn = noisy_quadratic(shape, 60, i, 3.0)
        ours = run_optimizer(lambda ps: cls(ps, **hypers), theta0, grad_fn, 60)
        theirs = run_optimizer(lambda ps: theirs_cls(ps, **hypers), theta0, grad_fn, 60)
        worst = max(worst, max_deviation(ours, theirs))
    assert worst < 1e-12, worst


def test_upstream_v2_changes_the_callers_grad():
    """The reason ours differs: upstream FARMSCropV2's step divides p.grad in place, leaving a_t there (ours: see
    test_grad_unchanged). On the first step R_1 = sqrt(Q_0) = 1, so a_1 = rms_clip(g, 1) = g / RMS(g) for RMS(g) > 1"""
    torch.manual_seed(0)
    p = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, dtype=torch.float64) * 10
    p.grad = g.clone()
    upstream_class('FARMSCropV2.py', 'FARMSCropV2')([p]).step()
    rms = g.pow(2).mean().sqrt()
    assert rms > 1
    torch.testing.assert_close(p.grad, g / rms, rtol=1e-12, atol=0)


# %% behaviour

@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_grad_unchanged(cls):
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 3, 2, 2, requires_grad=True),
              torch.randn(5, requires_grad=True)]
    opt = cls(params, lr=1e-2, centralization=1.0, weight_decay=0.1)
    for _ in range(3):
        grads = [10 * torch.randn_like(p) + 1.0 for p in params]
        for p, g in zip(params, grads): p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads): assert torch.equal(p.grad, g)


LRS = {FishMonger: 1e-2, FARMSCrop: 1e-2, FARMSCropV2: 1e-2}   # the chapters' fastai lr


def _mlp_losses(cls, lr, dtype=torch.float32, steps=200):
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = torch.sin(x @ torch.randn(8, 1)) + 0.5 * x[:, :1]
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)
    opt = cls(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_mlp_trains(cls):
    losses, _ = _mlp_losses(cls, LRS[cls])
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_bf16_trains_with_fp32_state(cls):
    losses, opt = _mlp_losses(cls, LRS[cls], dtype=torch.bfloat16)
    assert math.isfinite(losses[-1]) and losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    n = 0
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim():
                assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
                n += 1
    assert n >= 4 * len(opt.state)


def test_fishmonger_first_step_is_lr_over_one_minus_beta1():
    "The chapter's plot: the clipped direction has RMS 1, so the first step is η/(1-β1) per coordinate (RMS)"
    torch.manual_seed(0)
    p = torch.zeros(1000, requires_grad=True)
    p.grad = torch.randn(1000)
    FishMonger([p], lr=1e-2).step()
    assert abs(p.detach().pow(2).mean().sqrt().item() - 1e-2 / (1 - 0.9)) < 1e-3


def test_difference_state_appears_when_switched_on():
    "diff_amp / diff_mult = 0 keeps no difference state; switched on later, it starts with a zero difference"
    for cls, key, buf, after in ((FishMonger, 'diff_amp', 'ema_diff', 0.0), (FARMSCropV2, 'diff_mult', 'grad_diff_fim', 0.999)):
        p = torch.zeros(3, 2, requires_grad=True)
        opt = cls([p], lr=1e-2, **{key: 0.0})
        p.grad = torch.randn(3, 2)
        opt.step()
        assert buf not in opt.state[p] and 'previous_grad' not in opt.state[p]
        opt.param_groups[0][key] = 1.0
        p.grad = torch.randn(3, 2)
        opt.step()
        assert torch.equal(opt.state[p][buf], torch.full((3, 2), after)), (cls.__name__, opt.state[p][buf])
