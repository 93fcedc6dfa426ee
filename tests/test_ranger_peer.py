"""Ranger and Ranger21 (nbs/29_ranger.ipynb) against pytorch-optimizer 4.1 with identical explicit settings, and
against float64 transcriptions where pytorch-optimizer deviates:

- Ranger with `degenerated_to_sgd=False`: pytorch-optimizer (whose default it is) steps *uphill*, θ ← θ + η m̂_t, while
  ρ_t < 5 (its rectified step size is set to -1 there and then applied as momentum SGD); ours does not move θ at all
  then. So that setting is tested against the float64 transcription, the others against the peer with
  `degenerated_to_sgd=True` (our default, as Less Wright's ranger2020.py and the original RAdam code).
- Ranger at weight_decay=0 against a float64 transcription of ranger2020.py itself (with decay the two differ by
  design: Wright scales the decay by the step size, ours is pytorch-optimizer's (1 - lr*wd) or L2).
- Ranger21 with weight decay: pytorch-optimizer starts the sum of v̂ over all parameters at 1 instead of 0 (and has
  no ε), so its stable decay divides by √((1 + Σ v̂)/n) instead of √(Σ v̂/n). Settings with `weight_decay=0` are
  tested against the peer, those with decay against the transcription (and the peer against the transcription
  with the sum started at 1, to pin down that this is the only difference).

Peer-only switches set: `foreach=False` (its per-parameter path). Shapes are 1-D, 2-D and 4-D: for 3-D tensors
pytorch-optimizer's `unit_norm` (AGC, norm loss) takes dim 1 only, ours dims 1... (NFNets' unit).
"""
from __future__ import annotations
import math

import pytest
import torch

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

from optim_lab.checks import noisy_quadratic, max_deviation, peer_check
from optim_lab.optimizers.ranger import Ranger, Ranger21
from peer_versions import peer_is

SHAPES = ((7,), (4, 5), (2, 3, 2, 2))
STEPS = 100
TOL = 1e-5


def multi_run(make, steps, dtype, shapes=SHAPES):
    "Iterates (a list of tensors per step) of `make(params)` on one noisy quadratic per shape, stepped together"
    starts, fns = zip(*(noisy_quadratic(s, steps, seed=i, dtype=dtype) for i, s in enumerate(shapes)))
    ps = [x.clone().requires_grad_() for x in starts]
    opt = make(ps)
    out = []
    for t in range(1, steps + 1):
        for p, fn in zip(ps, fns): p.grad = fn(p.detach(), t).to(p.dtype)
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out, [x.double() for x in starts], fns


def deviation(a, b): return max(max_deviation(x, y) for x, y in zip(a, b, strict=True))


# %% Ranger

def ranger_reference(thetas, fns, steps, lr, betas=(0.95, 0.999), alpha=0.5, k=6, n_sma_threshold=5,
                     degenerated_to_sgd=True, weight_decay=0.0, decoupled_wd=True, use_gc=True, gc_conv_only=False,
                     eps=1e-5):
    "The chapter's equations in float64, one tensor at a time (Ranger does not couple tensors)"
    beta1, beta2 = betas
    rho_inf = 2 / (1 - beta2) - 1
    runs = []
    for theta, fn in zip(thetas, fns):
        m, v, slow, its = torch.zeros_like(theta), torch.zeros_like(theta), theta.clone(), []
        for t in range(1, steps + 1):
            g = fn(theta, t)
            if use_gc and g.dim() > (3 if gc_conv_only else 1): g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            rho = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
            rectified = rho > n_sma_threshold
            if decoupled_wd and (rectified or degenerated_to_sgd): theta = theta * (1 - lr * weight_decay)
            if not decoupled_wd: g = g + weight_decay * theta
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            m_hat = m / (1 - beta1 ** t)
            if rectified:
                r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
                theta = theta - lr * r * m_hat * math.sqrt(1 - beta2 ** t) / (v.sqrt() + eps)
            elif degenerated_to_sgd: theta = theta - lr * m_hat
            if t % k == 0:
                slow = slow + alpha * (theta - slow)
                theta = slow.clone()
            its.append(theta)
        runs.append(its)
    return [list(step) for step in zip(*runs)]


@pytest.mark.parametrize('ours, theirs', [
    (dict(degenerated_to_sgd=True), dict(degenerated_to_sgd=True)),
    (dict(degenerated_to_sgd=True, weight_decay=0.1, betas=(0.9, 0.99), k=3, alpha=0.7),
     dict(degenerated_to_sgd=True, weight_decay=0.1, betas=(0.9, 0.99), k=3, alpha=0.7)),
    (dict(degenerated_to_sgd=True, weight_decay=0.1, decoupled_wd=False, gc_conv_only=True, eps=1e-8),
     dict(degenerated_to_sgd=True, weight_decay=0.1, weight_decouple=False, gc_conv_only=True, eps=1e-8)),
], ids=['defaults+sgd', 'decoupled-k3', 'l2-conv-only'])
def test_ranger_vs_peer(ours, theirs):
    dev = peer_check(lambda ps: Ranger(ps, lr=1e-2, **ours),
                     lambda ps: pytorch_optimizer.Ranger(ps, lr=1e-2, foreach=False, **theirs), steps=STEPS, shapes=SHAPES)
    assert dev < TOL, dev


@pytest.mark.parametrize('hypers', [dict(degenerated_to_sgd=False),
                                    dict(degenerated_to_sgd=False, weight_decay=0.1, k=4, alpha=0.8, betas=(0.9, 0.999)),
                                    dict(weight_decay=0.1, decoupled_wd=False, gc_conv_only=True)],
                         ids=['no-step', 'no-step-decay-k4', 'default-sgd-l2'])
def test_ranger_vs_transcription(hypers):
    "Against the chapter's equations in float64 (the peer's degenerated_to_sgd=False differs: see the module docstring)"
    ours, starts, fns = multi_run(lambda ps: Ranger(ps, lr=1e-2, **hypers), STEPS, torch.float32)
    assert deviation(ours, ranger_reference(starts, fns, STEPS, lr=1e-2, **hypers)) < TOL


def wright_reference(thetas, fns, steps, lr, betas=(0.95, 0.999), alpha=0.5, k=6, n_sma_threshold=5, eps=1e-5):
    "ranger2020.py (2020.9.4, gc_loc=True, weight_decay=0) in float64, one tensor at a time"
    beta1, beta2 = betas
    n_sma_max = 2 / (1 - beta2) - 1
    runs = []
    for theta, fn in zip(thetas, fns):
        m, v, slow, its = torch.zeros_like(theta), torch.zeros_like(theta), theta.clone(), []
        for t in range(1, steps + 1):
            g = fn(theta, t)
            if g.dim() > 1: g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            v = beta2 * v + (1 - beta2) * g * g
            m = beta1 * m + (1 - beta1) * g
            n_sma = n_sma_max - 2 * t * beta2 ** t / (1 - beta2 ** t)
            if n_sma > n_sma_threshold:
                step_size = math.sqrt((1 - beta2 ** t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
                                      * n_sma_max / (n_sma_max - 2)) / (1 - beta1 ** t)
                theta = theta - step_size * lr * m / (v.sqrt() + eps)
            else: theta = theta - lr / (1 - beta1 ** t) * m
            if t % k == 0:
                slow = slow + alpha * (theta - slow)
                theta = slow.clone()
            its.append(theta)
        runs.append(its)
    return [list(step) for step in zip(*runs)]


@pytest.mark.parametrize('hypers', [dict(), dict(betas=(0.9, 0.99), k=4, alpha=0.8, eps=1e-8)], ids=['defaults', 'k4'])
def test_ranger_vs_wright(hypers):
    "Our defaults are Less Wright's Ranger (without weight decay)"
    ours, starts, fns = multi_run(lambda ps: Ranger(ps, lr=1e-2, **hypers), STEPS, torch.float32)
    assert deviation(ours, wright_reference(starts, fns, STEPS, lr=1e-2, **hypers)) < TOL


# %% Ranger21

def ranger21_reference(thetas, fns, steps, lr, num_iterations, beta0=0.9, betas=(0.9, 0.999), use_softplus=True,
                       beta_softplus=50.0, agc_clipping_value=1e-2, agc_eps=1e-3, lookahead_merge_time=5,
                       lookahead_blending_alpha=0.5, weight_decay=1e-4, decoupled_wd=True, norm_loss_factor=1e-4,
                       eps=1e-8, warm_down_min_lr=3e-5, v_sum_start=0.0, decay_eps=True):
    "The chapter's equations in float64 (all gradient transforms on, default warm-up/down for `num_iterations`)"
    beta1, beta2 = betas
    T = num_iterations
    W = math.ceil(2 / (1 - beta2))
    if W > 0.45 * T: W = int(0.22 * T)
    N = T - int(0.72 * T)
    def unit_norm(x): return x.norm() if x.dim() <= 1 else x.reshape(len(x), -1).norm(dim=1).reshape(-1, *[1] * (x.dim() - 1))
    thetas = list(thetas)
    zeros = lambda: [torch.zeros_like(x) for x in thetas]
    m1, m2, v, vmax, slow = zeros(), zeros(), zeros(), zeros(), [x.clone() for x in thetas]
    out = []
    for t in range(1, steps + 1):
        if t >= T - N:
            floor = min(warm_down_min_lr, lr)
            eta = floor + (lr - floor) * max(0.0, 1 - (t + 1 - (T - N)) / (N + 1))
        else: eta = lr * min(1.0, t / W) if W > 0 else lr
        gs = []
        for i, fn in enumerate(fns):
            g = fn(thetas[i], t)
            if not decoupled_wd: g = g + weight_decay * thetas[i]
            mx = unit_norm(thetas[i]).clamp(min=agc_eps) * agc_clipping_value
            gn = unit_norm(g).clamp(min=1e-6)
            g = torch.where(gn > mx, g * mx / gn, g)
            if g.dim() > 1: g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            if g.numel() > 2: g = g / (g.std() + 1e-8)
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            gs.append(g)
        v_bar = (v_sum_start + sum((x / (1 - beta2 ** t)).sum() for x in v)) / sum(x.numel() for x in thetas)
        lam = weight_decay if decoupled_wd else 0.0
        for i in range(len(thetas)):
            theta = thetas[i] * (1 - eta * lam / (v_bar.sqrt() + (eps if decay_eps else 0.0)))
            theta = theta - eta * 2 * norm_loss_factor * (1 - 1 / (unit_norm(theta) + eps)) * theta
            m = beta1 ** 2 * m2[i] + (1 - beta1 ** 2) * gs[i]
            n = ((1 + beta0) * m - beta0 * m1[i]) / math.sqrt((1 + beta0) ** 2 + beta0 ** 2)
            m2[i], m1[i] = m1[i], m
            vmax[i] = torch.maximum(vmax[i], v[i])
            denom = (vmax[i] / (1 - beta2 ** t)).sqrt() + eps
            if use_softplus: denom = torch.log1p(torch.exp(beta_softplus * denom)) / beta_softplus
            thetas[i] = theta - eta / (1 - beta1 ** t) * n / denom
        if t % lookahead_merge_time == 0:
            for i in range(len(thetas)):
                slow[i] = slow[i] + lookahead_blending_alpha * (thetas[i] - slow[i])
                thetas[i] = slow[i].clone()
        out.append([x.clone() for x in thetas])
    return out


@pytest.mark.parametrize('hypers', [
    dict(num_iterations=100, weight_decay=0.0),
    dict(num_iterations=200, weight_decay=0.0, betas=(0.9, 0.99), beta0=0.5, lookahead_merge_time=3,
         norm_loss_factor=1e-2, use_softplus=False),
    dict(num_iterations=80, weight_decay=0.0, agc_clipping_value=0.05, lookahead_blending_alpha=0.8, beta_softplus=10.0),
], ids=['defaults-no-decay', 'pnm-lookahead3-no-softplus', 'warmdown-within-run'])
def test_ranger21_vs_peer(hypers):
    dev = peer_check(lambda ps: Ranger21(ps, lr=1e-2, **hypers),
                     lambda ps: pytorch_optimizer.Ranger21(ps, lr=1e-2, foreach=False, **hypers),
                     steps=STEPS, shapes=SHAPES)
    assert dev < TOL, dev


@pytest.mark.parametrize('hypers', [dict(num_iterations=100, weight_decay=0.1),
                                    dict(num_iterations=60, weight_decay=0.5, beta0=0.5, betas=(0.8, 0.99))],
                         ids=['decay', 'strong-decay-warmdown'])
def test_ranger21_stable_decay(hypers):
    "With decay: ours against the transcription; the peer equals the transcription with the sum started at 1"
    ours, starts, fns = multi_run(lambda ps: Ranger21(ps, lr=1e-2, **hypers), STEPS, torch.float32)
    assert deviation(ours, ranger21_reference(starts, fns, STEPS, lr=1e-2, **hypers)) < TOL
    if peer_is('pytorch_optimizer'):
        peer, *_ = multi_run(lambda ps: pytorch_optimizer.Ranger21(ps, lr=1e-2, foreach=False, **hypers), STEPS, torch.float32)
        assert deviation(peer, ranger21_reference(starts, fns, STEPS, lr=1e-2, v_sum_start=1.0, decay_eps=False, **hypers)) < TOL
        assert deviation(ours, peer) > 10 * TOL


def test_ranger21_l2_is_applied():
    "decoupled_wd=False is L2 before AGC (pytorch-optimizer applies no decay at all in that mode)"
    hypers = dict(num_iterations=100, weight_decay=0.1, decoupled_wd=False)
    ours, starts, fns = multi_run(lambda ps: Ranger21(ps, lr=1e-2, **hypers), STEPS, torch.float32)
    assert deviation(ours, ranger21_reference(starts, fns, STEPS, lr=1e-2, **hypers)) < TOL
    peer, *_ = multi_run(lambda ps: pytorch_optimizer.Ranger21(ps, lr=1e-2, foreach=False, num_iterations=100,
                                                               weight_decay=0.1, weight_decouple=False), STEPS, torch.float32)
    no_decay, *_ = multi_run(lambda ps: pytorch_optimizer.Ranger21(ps, lr=1e-2, foreach=False, num_iterations=100,
                                                                   weight_decay=0.0), STEPS, torch.float32)
    if peer_is('pytorch_optimizer'):
        assert deviation(peer, no_decay) == 0.0


def test_ranger21_default_num_iterations():
    "Constructs without num_iterations: open-ended, untuned warm-up, no warm-down"
    g = Ranger21([torch.zeros(3, requires_grad=True)], lr=1e-3).param_groups[0]
    assert (g['num_iterations'], g['num_warm_up_iterations'], g['num_warm_down_iterations']) == (math.inf, 2000, 0)
