"""Adan (chapter 74) against a float64 transcription of the paper's algorithm (in the authors' β convention, with
their bias correction and g_0 = g_1) and against pytorch-optimizer 4.1, where the peer is right.

The transcription is written here again, independently of the chapter's, as a plain loop. Mixed 1-D/2-D/3-D
parameters in one optimizer, 60 steps; float64 agreement to 1e-10 (only rounding differs); the peer in float32 to
1e-5 over 100 steps (float32 rounding over 100 steps of an O(1) update stays near 1e-6). The peer's maximize=True
puts -2 g_1 into the first difference: tested against the transcription, not copied.
"""
from __future__ import annotations
import copy

import pytest
import torch

from optim_lab import load_optimizer
from histories import run, assert_close_histories, deviation
from peer_versions import peer_is

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')
Adan = load_optimizer('Adan')
SHAPES = [(7,), (4, 5), (3, 2, 2)]


def paper_adan(params, grads, lr, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, decoupled_wd=False):
    "The iterates of Adan on each parameter (float64), fed the gradient sequence `grads[k][i]`"
    b1, b2, b3 = betas
    out = [[p.clone() for p in params]]
    theta = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    n = [torch.zeros_like(p) for p in params]
    prev = [None] * len(params)
    for k, gs in enumerate(grads, 1):
        for i, g in enumerate(gs):
            g_prev = g if prev[i] is None else prev[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * (g - g_prev)
            n[i] = b3 * n[i] + (1 - b3) * (g + b2 * (g - g_prev)) ** 2
            eta = lr / ((n[i] / (1 - b3 ** k)).sqrt() + eps)
            step = eta * (m[i] / (1 - b1 ** k) + b2 * v[i] / (1 - b2 ** k))
            if decoupled_wd: theta[i] = theta[i] * (1 - lr * weight_decay) - step
            else: theta[i] = (theta[i] - step) / (1 + lr * weight_decay)
            prev[i] = g
        out.append([t.clone() for t in theta])
    return out


def quadratic_grads(steps=60, seed=0):
    "Start points for each shape and the noise of g_t = θ_{t-1} + noise_t, in float64"
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    noise = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    return params, noise


def run_ours(params, noise, sign=1.0, **hypers):
    ps = [p.clone().requires_grad_() for p in params]
    opt = Adan(ps, **hypers)
    hist, grads = [[p.detach().clone() for p in ps]], []
    for xi in noise:
        gs = [p.detach() + e for p, e in zip(ps, xi)]
        grads.append(gs)
        for p, g in zip(ps, gs): p.grad = sign * g
        opt.step()
        hist.append([p.detach().clone() for p in ps])
    return hist, grads


SETTINGS = [dict(lr=1e-2),
            dict(lr=1e-2, weight_decay=0.1),
            dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True),
            dict(lr=3e-2, betas=(0.9, 0.8, 0.95), eps=1e-4, weight_decay=0.5),
            dict(lr=5e-2, betas=(0.5, 0.0, 0.9), eps=1e-6, weight_decay=0.2, decoupled_wd=True)]


@pytest.mark.parametrize('hypers', SETTINGS, ids=str)
@pytest.mark.parametrize('maximize', [False, True])
def test_adan_matches_the_paper_in_float64(hypers, maximize):
    params, noise = quadratic_grads()
    sign = -1.0 if maximize else 1.0
    ours, grads = run_ours(params, noise, sign=sign, maximize=maximize, **hypers)
    # the gradients of the loss being minimised are `grads` either way (maximize negates -g back)
    paper = paper_adan(params, grads, **hypers)
    moved = max((a - b).abs().max().item() for a, b in zip(ours[-1], ours[0]))
    assert moved > 1e-2
    assert deviation(ours, paper) < 1e-10


def test_first_step_has_no_difference():
    "g_0 = g_1: after one step v is zero and n is (1 - β3) g_1²"
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = Adan([p], lr=1.0)
    p.grad = torch.arange(1.0, 6.0, dtype=torch.float64)
    opt.step()
    assert torch.equal(opt.state[p]['exp_avg_diff'], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(opt.state[p]['exp_avg_sq'], 0.01 * p.grad ** 2, rtol=1e-14, atol=0)


PEER_SETTINGS = [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-2, betas=(0.9, 0.8, 0.95), eps=1e-4),
                 dict(lr=1e-2, betas=(0.98, 0.92, 0.99), weight_decay=0.3)]


@pytest.mark.parametrize('hypers', PEER_SETTINGS, ids=str)
@pytest.mark.parametrize('decoupled', [False, True])
def test_adan_vs_pytorch_optimizer(hypers, decoupled):
    assert_close_histories(run(lambda ps: Adan(ps, decoupled_wd=decoupled, **hypers)),
                           run(lambda ps: pytorch_optimizer.Adan(ps, weight_decouple=decoupled, **hypers)),
                           f'Adan{hypers} decoupled_wd={decoupled}')


def test_peer_maximize_deviates_from_the_paper():
    "The peer's maximize=True first difference is -2 g_1; ours follows the paper (asserted above), the peer does not"
    params, noise = quadratic_grads(steps=50)
    ours, grads = run_ours(params, noise, sign=-1.0, maximize=True, lr=1e-2)
    paper = paper_adan(params, grads, lr=1e-2)
    ps = [p.float().clone().requires_grad_() for p in params]
    peer = pytorch_optimizer.Adan(ps, lr=1e-2, maximize=True)
    hist = [[p.detach().double().clone() for p in ps]]
    for xi in noise:
        for p, e in zip(ps, xi): p.grad = -(p.detach().double() + e).float()
        peer.step()
        hist.append([p.detach().double().clone() for p in ps])
    assert deviation(ours, paper) < 1e-10
    if peer_is('pytorch_optimizer'):
        assert deviation(hist, paper) > 1e-2   # the peer's first difference; it is ~1e-6 without maximize


@pytest.mark.parametrize('decoupled', [False, True])
def test_resume_bit_exact(decoupled):
    params, noise = quadratic_grads(steps=30)
    ps = [p.float().clone().requires_grad_() for p in params]
    qs = [p.float().clone().requires_grad_() for p in params]
    a = Adan(ps, lr=1e-2, weight_decay=0.1, decoupled_wd=decoupled)
    b = Adan(qs, lr=1e-2, weight_decay=0.1, decoupled_wd=decoupled)
    for t, xi in enumerate(noise):
        if t == 13:
            saved = copy.deepcopy(b.state_dict())
            qs = [q.detach().clone().requires_grad_() for q in qs]
            b = Adan(qs, lr=1e-2, weight_decay=0.1, decoupled_wd=decoupled)
            b.load_state_dict(saved)
        for p, q, e in zip(ps, qs, xi):
            p.grad = (p.detach().double() + e).float()
            q.grad = (q.detach().double() + e).float()
        a.step(); b.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
