"""FCompass and TALON (Clybius/Personalized-Optimizers at bfa2fdd): against float64 transcriptions of upstream's step
rules, `p.grad` untouched, a small regression MLP trained, bf16 weights with fp32 state; and the spectral clip.
The transcriptions are written from the same reading of upstream as the classes (upstream's own classes are not run):
they catch slips between the equations and the code, not a misreading of upstream."""
from __future__ import annotations
import math
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch
from torch import nn

from optim_lab.checks import reference_check
from optim_lab.optimizers.fcompass import FCompass
from optim_lab.optimizers.talon import TALON
from optim_lab.toolkit.spectral import spectral_clip

SHAPES = ((7,), (4, 5), (3, 2, 2, 2))


# %% float64 transcriptions of upstream's FCompass.py and TALON.py (commit bfa2fdd), written from the equations

def fcompass_reference(theta, grad_fn, steps, lr=1e-3, betas=(0.99, 0.999), amp_fac=2, eps=1e-8, weight_decay=0.1,
                       clip=1.0, centralization=1.0):
    beta1, beta2 = betas
    m, u, fim = torch.zeros_like(theta), torch.zeros_like(theta), torch.ones_like(theta)
    def clipped(x):
        if clip == 0: return x
        rms = x.pow(2).mean().sqrt().item() + eps
        return x / (max(1.0, rms) / clip)
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        if centralization != 0 and g.dim() > 1:
            g = g - centralization * g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
        cb2 = (beta2 ** t - beta2) / (beta2 ** t - 1.0)
        bc = (1 - cb2 ** t) ** 0.5
        fim = cb2 * fim + (1 - cb2) * g * g
        base = fim.sqrt() + eps
        nat = clipped(g / base)
        m = beta1 * m + (1 - beta1) * nat
        full = nat + amp_fac * m + weight_decay * clipped(theta / base)
        u = torch.maximum(u, beta2 * u + (1 - beta2) * full * full)
        theta = theta - lr * full / (u.sqrt() / bc + eps)
        out.append(theta)
    return out


NS = [(3.5318, -4.7911, 1.9388), (3.3274, -4.0557, 1.5782), (3.0809, -3.5160, 1.3464),
      (2.7476, -2.8484, 1.0775), (2.2948, -2.0951, 0.7895), (2.1535, -1.8338, 0.6869)]


def _msign(M):
    tr = M.shape[0] < M.shape[1]
    if tr: M = M.T
    M = M / (torch.linalg.norm(M) + 1e-20)
    for a, b, c in NS:
        A = M.T @ M
        M = M @ (a * torch.eye(A.shape[0], dtype=M.dtype) + b * A + c * A @ A)
    return M.T if tr else M


def _clip(W, lo, hi):
    flip = W.shape[0] > W.shape[1]
    if flip: W = W.T
    O = _msign(W)
    I = torch.eye(W.shape[0], dtype=W.dtype)
    R = 0.5 * ((lo + hi) * I + (lo * O - W) @ _msign(lo * O - W).T - (hi * O - W) @ _msign(hi * O - W).T) @ O
    return R.T if flip else R


def _level(v, lo, hi):
    mats = v.reshape(-1, 1)[None] if v.dim() == 1 else v.reshape(-1, *v.shape[-2:])
    return torch.stack([_clip(m, lo, hi) for m in mats]).reshape(v.shape) / len(mats)


def talon_reference(theta, grad_fn, steps, lr=1e-4, betas=(0.9, 0.99, 1 - 1e-7), weight_decay=0.0,
                    weight_decay_rate=0.995, denom_atan2=True, spectral_clip=True, spectral_min=-1.0,
                    spectral_max=1.0, signscale_power=1.0):
    s, v, w = torch.zeros_like(theta), torch.ones_like(theta), torch.ones_like(theta)
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        b2 = (betas[1] ** t - betas[1]) / (betas[1] ** t - 1.0)
        b3 = (betas[2] ** t - betas[2]) / (betas[2] ** t - 1.0)
        g = g / max(1.0, g.pow(2).mean().sqrt().item())
        s = torch.lerp(s, torch.sign(g), 1 - betas[0])
        g = torch.where(g.abs() > 255, g * (255 / g.abs()), g)
        v = v * b2 + (1 - b2) * g.abs()
        c = _level(v, spectral_min, spectral_max) if spectral_clip else v
        if denom_atan2: d = torch.atan2(c, w.sqrt()) * 1.27323954474
        else: d = (c / torch.clamp(w.sqrt(), 1e-16)).clamp(-t ** 0.25, t ** 0.25)
        w = w * b3 + (1 - b3) * g * g
        d = d * (s.abs() ** signscale_power * torch.sign(s))
        d = d + weight_decay * weight_decay_rate ** t * theta
        theta = theta - lr * d
        out.append(theta)
    return out


# %% against the transcriptions, float64

@pytest.mark.parametrize('hypers', [dict(), dict(lr=3e-2, betas=(0.9, 0.99), amp_fac=1.0, weight_decay=0.0, clip=0.5,
                                                   centralization=0.5)], ids=['defaults', 'other'])
def test_fcompass_vs_upstream_rule(hypers):
    dev = reference_check(FCompass, fcompass_reference, steps=60, shapes=SHAPES, noise=3.0, **hypers)
    assert dev < 1e-12, dev


@pytest.mark.parametrize('hypers', [dict(), dict(lr=3e-2, betas=(0.8, 0.95, 0.999), weight_decay=0.1,
                                                   weight_decay_rate=0.99, denom_atan2=False, spectral_min=0.2,
                                                   spectral_max=0.5, signscale_power=2.0)], ids=['defaults', 'other'])
def test_talon_vs_upstream_rule(hypers):
    dev = reference_check(TALON, talon_reference, steps=40, shapes=SHAPES, noise=3.0, **hypers)
    assert dev < 1e-10, dev   # upstream's 4/π is 1.27323954474 (4e-12 relative off)


def test_defaults_equal_upstream():
    import inspect
    f = {k: v.default for k, v in inspect.signature(FCompass).parameters.items()}
    assert (f['lr'], f['betas'], f['amp_fac'], f['eps'], f['weight_decay'], f['clip'], f['centralization']) == \
        (1e-3, (0.99, 0.999), 2, 1e-8, 0.1, 1.0, 1.0)
    t = {k: v.default for k, v in inspect.signature(TALON).parameters.items()}
    assert (t['lr'], t['betas'], t['weight_decay'], t['weight_decay_rate'], t['denom_atan2'], t['spectral_clip'],
            t['spectral_min'], t['spectral_max'], t['signscale_power']) == \
        (1e-4, (0.9, 0.99, 1. - 1e-7), 0.0, 0.995, True, True, -1.0, 1.0, 1.0)


# %% behaviour

@pytest.mark.parametrize('cls', [FCompass, TALON])
def test_grad_unchanged(cls):
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 3, 2, 2, requires_grad=True), torch.randn(5, requires_grad=True)]
    opt = cls(params, lr=1e-2)
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


LRS = {FCompass: 1e-2, TALON: 1e-2}


@pytest.mark.parametrize('cls', [FCompass, TALON])
def test_mlp_trains(cls):
    losses, _ = _mlp_losses(cls, LRS[cls])
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize('cls', [FCompass, TALON])
def test_bf16_trains_with_fp32_state(cls):
    losses, opt = _mlp_losses(cls, LRS[cls], dtype=torch.bfloat16)
    assert losses[-1] < 0.7 * losses[0] and math.isfinite(losses[-1])
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim():
                assert v.dtype == torch.float32 and torch.isfinite(v).all(), k


# %% the spectral clip

def test_spectral_clip_matches_svd():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 12, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 12, generator=g, dtype=torch.float64))
    s = torch.logspace(-1.5, 0.5, 12, dtype=torch.float64)
    w = u @ torch.diag(s) @ v.T
    for a, b in ((-1.0, 1.0), (0.3, 0.8)):
        exact = u @ torch.diag(s.clamp(a, b)) @ v.T
        for m in (w, w.T.contiguous()):
            ref = exact if m is w else exact.T
            assert (spectral_clip(m, a, b) - ref).norm() / ref.norm() < 0.05
    assert torch.allclose(spectral_clip(w, a, b), _clip(w, a, b), atol=1e-12)


# %% TALON's β̂ in float32 (compile=True traces hyperparameters and the step as float32 0-d tensors)

BETA3_F32 = float(torch.tensor(1 - 1e-7, dtype=torch.float32))   # the default β3 as float32 holds it: 1 - 1.19e-7


@pytest.mark.parametrize('step', [10, 10 ** 3, 10 ** 5, 10 ** 7])
def test_talon_one_minus_beta_hat_float32(step):
    "1 - β̂ = (1-β)/(1-β^t) against float64; the plain (β^t-β)/(β^t-1) in float32 is off by 1.3e-3 at t = 1e5, 4e-2 at 1e7"
    from optim_lab.optimizers.talon import one_minus_beta_hat
    exact = (1 - BETA3_F32) / -math.expm1(step * math.log1p(-(1 - BETA3_F32)))
    got = one_minus_beta_hat(torch.tensor(BETA3_F32), torch.tensor(float(step))).item()
    assert abs(got / exact - 1) < 1e-5, (got, exact)
    assert abs(one_minus_beta_hat(1 - 1e-7, step) / ((1e-7) / (1 - (1 - 1e-7) ** step)) - 1) < 1e-6   # eager, float64


def _talon_late_step(compile):
    "One TALON step at t = 1e5 from a fixed state with small w (so float32 resolves w's increment): (w before, w after)"
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in ((16, 8), (8,))]
    opt = TALON(params, lr=1e-2, betas=(0.9, 0.99, BETA3_F32), compile=compile)
    for p in params: p.grad = torch.randn(p.shape, generator=g)
    opt.step()                                                 # creates the state
    for p in params:
        opt.state[p]['step'] = 10 ** 5 - 1
        opt.state[p]['stage2_emasq'].fill_(1e-3)
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return [opt.state[p]['stage2_emasq'].clone() for p in params]


def test_talon_compiled_matches_eager_at_default_beta3():
    "w's increment (1 - β̂)(ḡ² - w), about 1e-5 here: the compiled step within 1e-4 relative of the eager one"
    import torch._dynamo
    torch._dynamo.reset()
    eager, compiled = _talon_late_step(False), _talon_late_step(True)
    for e, c in zip(eager, compiled):
        rel = ((c - 1e-3) / (e - 1e-3) - 1).abs().max().item()
        assert rel < 1e-4, rel
