"""FMARSCrop, FMARSCropExMachina and FMARSCropV2 (Clybius/Personalized-Optimizers at bfa2fdd): against float64
transcriptions of upstream's step rules, defaults parsed from upstream's source, `p.grad` untouched, a small regression
MLP trained, bf16 weights with fp32 state, and upstream's float16 NaN (README) not happening here."""
from __future__ import annotations
import ast
import inspect
import math
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch
from torch import nn

from optim_lab.checks import max_deviation, noisy_quadratic, reference_check, run_optimizer
from optim_lab.optimizers.fmarscrop import FMARSCrop, FMARSCropExMachina, FMARSCropV2
from clybius_upstream import upstream_class, upstream_source

SHAPES = ((7,), (4, 5), (3, 2, 2, 2))
CLASSES = (FMARSCrop, FMARSCropExMachina, FMARSCropV2)
UPSTREAM = {FMARSCrop: ('FMARSCrop.py', 'FMARSCrop'), FMARSCropExMachina: ('FMARSCrop_ExMachina.py', 'FMARSCrop_ExMachina'),
            FMARSCropV2: ('FMARSCropV2.py', 'FMARSCropV2')}


# %% float64 transcription of upstream's three step rules (commit bfa2fdd), written from the equations

def _rms_clipped(x, clip):
    return x / (max(clip, x.pow(2).mean().sqrt().item()) / clip)


def _units(x):  # upstream's unit_norm (from pytorch_optimizer): dim 1 for 2-D and 3-D, dims 1... for 4-D and up
    if x.dim() <= 1: return x.norm()
    return torch.linalg.vector_norm(x, dim=1 if x.dim() in (2, 3) else tuple(range(1, x.dim())), keepdim=True)


def upstream_rule(theta, grad_fn, steps, variant, lr, betas, eps, weight_decay, centralization, moment_centralization,
                  diff_mult, momentum_beta, momentum_lambda, clip, gamma=None, eps2=None, eps_floor=None,
                  cautious=False, adaptive_clip=0.0, adaptive_clip_eps=None):
    b1, b2 = betas
    m, fim, gdf = torch.zeros_like(theta), torch.ones_like(theta), torch.ones_like(theta)
    if eps_floor is not None and eps_floor < eps and eps_floor <= 0: eps_floor = 1e-36 if variant == 'v2' else 1e-38
    prev, out = None, []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        diff = g - (g if prev is None else prev)
        if variant == 'v1': c = g + (1 - b1) / 2 * b1 / (1 - b1) * diff
        else: c = g + gamma * b1 / (1 - b1) * diff
        if variant != 'v2':
            norm = c.norm().item()
            if norm > clip: c = c * clip / norm
        elif adaptive_clip > 0:
            most = _units(theta).clamp(min=adaptive_clip_eps) * adaptive_clip
            cn = _units(c).clamp(min=1e-6)
            c = torch.where(cn > most, c * (most / cn), c)
        cur_eps = eps
        if variant != 'v1' and eps_floor is not None and eps_floor < eps:
            cur_eps = max(min(eps, eps2 * g.pow(2).mean().sqrt().item()), eps_floor)
        if diff_mult > 0:
            d = _rms_clipped(diff * diff_mult, clip)
            E = gdf.sqrt().clamp(min=cur_eps)
            gdf = (b1 * gdf + (1 - b1) * d * d).clamp(max=t ** 0.25)
        else: E = 1.0
        approx = _rms_clipped(c / E, clip)
        D = fim.sqrt().clamp(min=cur_eps)
        nat = _rms_clipped((c if variant == 'exmachina' else approx) / D / E, clip)
        if variant == 'v2':
            m = momentum_beta * m + (1 - momentum_beta) * nat
            mc = m - moment_centralization * m.mean()
            if cautious:
                keep = (mc * nat < 0).double()
                mc = mc * keep / max(keep.mean().item(), 1e-3)
        else: mc = m - m.mean() if moment_centralization != 0 else m
        full = nat + t ** momentum_lambda * mc
        if centralization != 0 and full.dim() > 1:
            full = full - centralization * full.mean(dim=tuple(range(1, full.dim())), keepdim=True)
        if weight_decay != 0: theta = theta - lr * weight_decay * _rms_clipped(theta / D / E, clip)
        if cautious and variant == 'exmachina':
            keep = (full * c > 0).double()
            full = full * keep * (keep.numel() / (keep.sum().item() + 1))
        if cautious and variant == 'v2':
            keep = (full * nat > 0).double()
            full = full * keep / max(keep.mean().item(), 1e-3)
        theta = theta - lr * full
        fsb = ((b2 ** t - b2) / (b2 ** t - 1.0)) ** 0.5
        fim = (fsb * fim + (1 - fsb) * approx * approx).clamp(max=t ** 0.25)
        if variant != 'v2': m = momentum_beta * m + (1 - momentum_beta) * nat
        prev = g
        out.append(theta)
    return out


VARIANT = {FMARSCrop: 'v1', FMARSCropExMachina: 'exmachina', FMARSCropV2: 'v2'}
# the upstream defaults, written out by hand (test_defaults_equal_upstream checks them against upstream's source)
UPSTREAM_DEFAULTS = {
    FMARSCrop: dict(lr=1e-4, betas=(0.999, 0.9999), eps=1e-6, weight_decay=0.0, centralization=0.0,
                    moment_centralization=1.0, diff_mult=1.0, momentum_beta=0.9999, momentum_lambda=0.25, clip=1.0),
    FMARSCropExMachina: dict(lr=1.5e-4, betas=(0.999, 0.9999), eps=1e-6, eps2=1e-2, eps_floor=None, weight_decay=0.01,
                             centralization=0.0, moment_centralization=1.0, diff_mult=1.0, momentum_beta=0.9999,
                             momentum_lambda=0.25, gamma=0.0005, clip=1.0, cautious=True),
    FMARSCropV2: dict(lr=1e-4, betas=(0.999, 0.9999), eps=1e-6, eps2=1e-2, eps_floor=None, weight_decay=0.01,
                      centralization=0.0, moment_centralization=0.0, diff_mult=0.0, momentum_beta=0.99,
                      momentum_lambda=0.1, gamma=0.001, clip=1.0, adaptive_clip=1.0, adaptive_clip_eps=1e-3,
                      cautious=True)}
OTHER = {
    FMARSCrop: dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.1, centralization=0.5, moment_centralization=0.0,
                    diff_mult=0.1, momentum_beta=0.9, momentum_lambda=0.5, clip=0.5),
    FMARSCropExMachina: dict(lr=3e-2, betas=(0.9, 0.99), eps=0.1, eps2=3e-3, eps_floor=0.0, weight_decay=0.1,
                             centralization=0.5, moment_centralization=0.0, diff_mult=0.1, momentum_beta=0.9,
                             momentum_lambda=0.5, gamma=0.02, clip=0.5, cautious=False),
    FMARSCropV2: dict(lr=3e-2, betas=(0.9, 0.99), eps=0.1, eps2=3e-3, eps_floor=0.02, weight_decay=0.1,
                      centralization=0.5, moment_centralization=0.5, diff_mult=1.0, momentum_beta=0.9, gamma=0.02,
                      clip=0.5, adaptive_clip=0.3, adaptive_clip_eps=2.0)}


def _reference_for(cls):
    return lambda theta, grad_fn, steps, **h: upstream_rule(theta, grad_fn, steps, VARIANT[cls],
                                                            **{**UPSTREAM_DEFAULTS[cls], **h})


# %% against the transcription, float64

@pytest.mark.parametrize('setting', ['defaults', 'defaults_lr', 'other'])
@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_vs_upstream_rule(cls, setting):
    hypers = dict(defaults={}, defaults_lr=dict(lr=1e-2), other=OTHER[cls])[setting]
    dev = reference_check(cls, _reference_for(cls), steps=60, shapes=SHAPES, noise=3.0, **hypers)
    assert dev < 1e-12, dev


@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_reference_sees_the_options(cls):
    "The 'other' setting moves the trajectory away from the defaults' (so that the comparison above tests something)"
    from optim_lab.checks import noisy_quadratic
    theta0, grad_fn = noisy_quadratic((4, 5), 60, 1, 3.0)
    ref = _reference_for(cls)
    base = {k: v for k, v in OTHER[cls].items()}
    for k in OTHER[cls]:
        if (cls, k) == (FMARSCropV2, 'eps'): continue   # with a floor below ε, ε only caps ε₂·RMS(g), below it here
        changed = dict(base, **{k: UPSTREAM_DEFAULTS[cls][k]})
        a, b = ref(theta0.clone(), grad_fn, 60, **base)[-1], ref(theta0.clone(), grad_fn, 60, **changed)[-1]
        assert (a - b).abs().max() > 1e-8, f'{cls.__name__}: {k} has no effect in the "other" setting'


def _upstream_defaults(cls) -> dict:
    "The keyword defaults of upstream's `__init__`, parsed from its source text (read with git, see clybius_upstream.py)"
    path, name = UPSTREAM[cls]
    src = upstream_source(path)
    cdef = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == name)
    init = next(n for n in cdef.body if isinstance(n, ast.FunctionDef) and n.name == '__init__')
    args = init.args.args[-len(init.args.defaults):]
    return {a.arg: ast.literal_eval(d) for a, d in zip(args, init.args.defaults)}


@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_defaults_equal_upstream(cls):
    upstream = _upstream_defaults(cls)
    ours = {k: v.default for k, v in inspect.signature(cls).parameters.items()
            if k not in ('params', 'kwargs', 'maximize')}
    assert ours == upstream
    assert UPSTREAM_DEFAULTS[cls] == upstream   # the transcription's defaults too


@pytest.mark.parametrize('setting', ['defaults_lr', 'other'])
@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_vs_upstream_class(cls, setting):
    """Upstream's own class, executed from its source at bfa2fdd, beside ours in float64 (60 steps, three shapes):
    independent of our reading of upstream, which the transcription above shares with the code"""
    hypers = dict(defaults_lr=dict(lr=1e-2), other=OTHER[cls])[setting]
    theirs_cls, worst = upstream_class(*UPSTREAM[cls]), 0.0
    for i, shape in enumerate(SHAPES):
        theta0, grad_fn = noisy_quadratic(shape, 60, i, 3.0)
        ours = run_optimizer(lambda ps: cls(ps, **hypers), theta0, grad_fn, 60)
        theirs = run_optimizer(lambda ps: theirs_cls(ps, **hypers), theta0, grad_fn, 60)
        assert (theirs[-1] - theta0).abs().max() > 1e-3, 'upstream did not move'
        worst = max(worst, max_deviation(ours, theirs))
    assert worst < 1e-12, worst


# %% behaviour

@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_grad_unchanged(cls):
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 3, 2, 2, requires_grad=True),
              torch.randn(5, requires_grad=True)]
    opt = cls(params, lr=1e-2, centralization=0.5, weight_decay=0.1, diff_mult=1.0)
    for _ in range(3):
        grads = [torch.randn_like(p) + 1.0 for p in params]
        for p, g in zip(params, grads): p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads): assert torch.equal(p.grad, g)


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


LR = 1e-2   # the chapter's lr (49_fmarscrop): steps are about lr per coordinate


@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_mlp_trains(cls):
    losses, _ = _mlp_losses(cls, LR)
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize('cls', CLASSES, ids=lambda c: c.__name__)
def test_bf16_trains_with_fp32_state(cls):
    losses, opt = _mlp_losses(cls, LR, dtype=torch.bfloat16)
    assert losses[-1] <= 0.5 * losses[0] and math.isfinite(losses[-1]), (losses[0], losses[-1])
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim():
                assert v.dtype == torch.float32 and torch.isfinite(v).all(), k


# %% upstream README: "a low beta1, along with diff_mult, may yield a NaN early-on in training"

def _quiet_problem(dtype, n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta0 = (3 * torch.randn(n, generator=gen)).to(dtype)
    sigma = torch.cat([torch.zeros(n // 4), torch.full((n - n // 4,), 3.0)])
    return theta0, lambda theta, t: (theta.float() - 1 + sigma * torch.randn(n, generator=gen)).to(dtype)


def test_low_beta1_with_diff_mult_nans_in_float16_arithmetic_only():
    hypers = dict(UPSTREAM_DEFAULTS[FMARSCrop], lr=1e-2, betas=(0.5, 0.9999))
    theta0, grad_fn = _quiet_problem(torch.float16)
    upstream_like = upstream_rule(theta0, grad_fn, 100, 'v1', **hypers)          # computing in float16, as upstream
    assert not torch.isfinite(upstream_like[-1]).all()
    theta0, grad_fn = _quiet_problem(torch.float16)
    assert torch.isfinite(upstream_rule(theta0, grad_fn, 100, 'v1', **dict(hypers, diff_mult=0.0))[-1]).all()
    theta0, grad_fn = _quiet_problem(torch.float16)
    p = theta0.clone().requires_grad_()
    opt = FMARSCrop([p], **{k: v for k, v in hypers.items()})
    for t in range(1, 101):
        p.grad = grad_fn(p.detach(), t)
        opt.step()
    assert torch.isfinite(p).all() and all(torch.isfinite(v).all() for v in opt.state[p].values()
                                           if isinstance(v, torch.Tensor))
