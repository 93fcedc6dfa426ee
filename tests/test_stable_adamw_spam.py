"""StableAdamW and SPAM (chapter 75) against float64 transcriptions of their algorithms (Wortsman et al. 2023,
Algorithm 2; the SPAM authors' code) and against pytorch-optimizer 4.1 where the peer is right.

The transcriptions are written here again, independently of the chapter's, as plain loops over mixed 1-D/2-D/3-D
parameters in one optimizer. float64 agreement to 1e-10 (only rounding differs); the peer in float32 to 1e-5 over
100 steps. SPAM's hyperparameters are shrunk so that 60 steps see resets, warm-ups and clipped spikes, and the tests
count them. pytorch-optimizer's SPAM warm-up is one step ahead of the authors' (its CosineDecay advances before it
is read): the peer is compared without resets, and with resets against the transcription with that offset.
"""
from __future__ import annotations
import copy, math

import pytest
import torch

from optim_lab import load_optimizer
from histories import run, assert_close_histories, deviation

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')
StableAdamW, SPAM = load_optimizer('StableAdamW'), load_optimizer('SPAM')
SHAPES = [(7,), (4, 5), (3, 2, 2)]


def noise_sequence(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    return params, [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


def run_ours(cls, params, noise, maximize=False, **hypers):
    "Iterates of `cls`, and the gradients g_t = θ_{t-1} + noise_t it was fed (negated to it when maximizing)"
    ps = [p.clone().requires_grad_() for p in params]
    opt = cls(ps, maximize=maximize, **hypers)
    hist, grads = [[p.detach().clone() for p in ps]], []
    for xi in noise:
        gs = [p.detach() + e for p, e in zip(ps, xi)]
        grads.append(gs)
        for p, g in zip(ps, gs): p.grad = -g if maximize else g
        opt.step()
        hist.append([p.detach().clone() for p in ps])
    return hist, grads


# %% StableAdamW

def paper_stable_adamw(params, grads, lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2, decoupled_wd=True):
    b1, b2 = betas
    theta = [p.clone() for p in params]
    v = [torch.zeros_like(p) for p in params]
    u = [torch.zeros_like(p) for p in params]
    out = [[t.clone() for t in theta]]
    for t, gs in enumerate(grads, 1):
        hat1 = b1 * (1 - b1 ** (t - 1)) / (1 - b1 ** t)
        hat2 = b2 * (1 - b2 ** (t - 1)) / (1 - b2 ** t)
        for i, g in enumerate(gs):
            if not decoupled_wd: g = g + weight_decay * theta[i]
            v[i] = hat1 * v[i] + (1 - hat1) * g
            u[i] = hat2 * u[i] + (1 - hat2) * g ** 2
            rms = math.sqrt(float((g ** 2 / torch.clamp(u[i], min=eps ** 2)).mean()))
            eta = lr / max(1.0, rms)
            lam = weight_decay if decoupled_wd else 0.0
            theta[i] = theta[i] - eta * lam * theta[i] - eta * v[i] / (u[i].sqrt() + eps)
        out.append([x.clone() for x in theta])
    return out


SAW_SETTINGS = [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, decoupled_wd=False),
                dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.3),
                dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.0)]


@pytest.mark.parametrize('hypers', SAW_SETTINGS, ids=str)
@pytest.mark.parametrize('maximize', [False, True])
def test_stable_adamw_matches_the_paper_in_float64(hypers, maximize):
    params, noise = noise_sequence(60)
    ours, grads = run_ours(StableAdamW, params, noise, maximize=maximize, **hypers)
    assert deviation(ours, paper_stable_adamw(params, grads, **hypers)) < 1e-10


def test_stable_adamw_clip_fires_and_shrinks_the_step():
    "A tensor whose gradient grows 10x at once: the clip factor is > 3 then, and the step is not larger than before"
    x = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    opt = StableAdamW([x], lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for t in range(1, 61):
        x.grad = (10.0 if t > 40 else 1.0) * torch.randn(64, generator=gen, dtype=torch.float64)
        before = x.detach().clone()
        opt.step()
        sizes.append((x.detach() - before).norm().item())
        if t == 41: assert opt.state[x]['clip_factor'] > 3
        if t == 40: assert opt.state[x]['clip_factor'] < 2
    assert max(sizes[40:]) < 1.5 * max(sizes[20:40])


@pytest.mark.parametrize('hypers', [dict(lr=1e-2), dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.3)], ids=str)
@pytest.mark.parametrize('decoupled', [True, False])
def test_stable_adamw_vs_pytorch_optimizer(hypers, decoupled):
    assert_close_histories(run(lambda ps: StableAdamW(ps, decoupled_wd=decoupled, **hypers)),
                           run(lambda ps: pytorch_optimizer.StableAdamW(ps, weight_decouple=decoupled, **hypers)),
                           f'StableAdamW{hypers} decoupled_wd={decoupled}')


# %% SPAM

def authors_spam(params, grads, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, decoupled_wd=True,
                 warmup_epoch=50, threshold=5000, grad_accu_steps=20, update_proj_gap=500, warmup_offset=0,
                 counts=None):
    "The SPAM authors' algorithm; `warmup_offset=1` reads the warm-up cosine one step ahead, as pytorch-optimizer"
    b1, b2 = betas
    theta = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    out = [[t.clone() for t in theta]]
    for t, gs in enumerate(grads, 1):
        since = t % update_proj_gap
        if since == 0:
            m = [torch.zeros_like(p) for p in params]
            v = [torch.zeros_like(p) for p in params]
            if counts is not None: counts['resets'] += 1
        if t >= update_proj_gap and since < warmup_epoch:
            scale = 1 - 0.99 * (1 + math.cos(math.pi * (since + warmup_offset) / (warmup_epoch + 1))) / 2
            if counts is not None: counts['warm'] += 1
        else: scale = 1.0
        for i, g in enumerate(gs):
            if not decoupled_wd: g = g + weight_decay * theta[i]
            if threshold != 0 and t >= grad_accu_steps and since >= grad_accu_steps:
                spike = g ** 2 > threshold * v[i]
                if counts is not None: counts['clipped'] += int(spike.sum())
                g = torch.where(spike, g.sign() * (threshold * v[i]).sqrt(), g)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g ** 2
            step = lr * scale * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            theta[i] = theta[i] - step * m[i] / (v[i].sqrt() + eps)
            if decoupled_wd: theta[i] = theta[i] * (1 - lr * weight_decay)
        out.append([x.clone() for x in theta])
    return out


TOY = dict(update_proj_gap=20, grad_accu_steps=5, warmup_epoch=8, threshold=3.0)
SPAM_SETTINGS = [dict(lr=1e-2, **TOY), dict(lr=1e-2, weight_decay=0.1, **TOY),
                 dict(lr=1e-2, weight_decay=0.1, decoupled_wd=False, **TOY),
                 dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-4, update_proj_gap=15, warmup_epoch=30, grad_accu_steps=2,
                      threshold=10.0),
                 dict(lr=1e-2, update_proj_gap=25, warmup_epoch=10, grad_accu_steps=3, threshold=0)]


@pytest.mark.parametrize('hypers', SPAM_SETTINGS, ids=str)
@pytest.mark.parametrize('maximize', [False, True])
def test_spam_matches_the_authors_in_float64(hypers, maximize):
    params, noise = noise_sequence(60)
    ours, grads = run_ours(SPAM, params, noise, maximize=maximize, **hypers)
    counts = dict(resets=0, warm=0, clipped=0)
    theirs = authors_spam(params, grads, counts=counts, **hypers)
    assert counts['resets'] >= 2 and counts['warm'] > 0
    assert (counts['clipped'] > 0) == (hypers['threshold'] > 0)
    assert max((a - b).abs().max().item() for a, b in zip(ours[-1], ours[0])) > 1e-2
    assert deviation(ours, theirs) < 1e-10


def test_spam_defaults_are_adam_before_step_20():
    "With the defaults, the first 19 steps are Adam's with eps added to sqrt(v) (no reset, no clip, no warm-up)"
    params, noise = noise_sequence(19)
    ours, grads = run_ours(SPAM, params, noise, lr=1e-2)
    assert deviation(ours, authors_spam(params, grads, lr=1e-2, threshold=0)) < 1e-12


def test_spam_vs_pytorch_optimizer_without_resets():
    hypers = dict(lr=1e-2, update_proj_gap=1000, grad_accu_steps=5, warmup_epoch=8, threshold=3.0)
    assert_close_histories(run(lambda ps: SPAM(ps, **hypers)), run(lambda ps: pytorch_optimizer.SPAM(ps, **hypers)),
                           f'SPAM{hypers}')


@pytest.mark.parametrize('weight_decay', [0.0, 0.1])
def test_peer_spam_warmup_is_one_step_ahead(weight_decay):
    "With resets the peer equals the authors' loop with the warm-up read one step ahead, and differs from the loop"
    params, noise = noise_sequence(60)
    ps = [p.clone().requires_grad_() for p in params]
    peer = pytorch_optimizer.SPAM(ps, lr=1e-2, weight_decay=weight_decay, **TOY)
    hist = [[p.detach().clone() for p in ps]]
    peer_grads = []
    for xi in noise:
        gs = [p.detach() + e for p, e in zip(ps, xi)]
        peer_grads.append(gs)
        for p, g in zip(ps, gs): p.grad = g.clone()
        peer.step()
        hist.append([p.detach().clone() for p in ps])
    shifted = authors_spam(params, peer_grads, lr=1e-2, weight_decay=weight_decay, warmup_offset=1, **TOY)
    authors = authors_spam(params, peer_grads, lr=1e-2, weight_decay=weight_decay, **TOY)
    assert deviation(hist, shifted) < 1e-10
    assert deviation(hist, authors) > 1e-3


def test_spam_grad_accu_steps_zero_freezes():
    "With A = 0 every gradient meets v = 0 and is clipped to 0: nothing moves (as in the authors' code)"
    p = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = SPAM([p], lr=0.1, grad_accu_steps=0)
    for _ in range(5):
        p.grad = torch.randn(4, dtype=torch.float64)
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.float64))


# %% Both: resume bit for bit across a reset and a warm-up

@pytest.mark.parametrize('cls,hypers', [(StableAdamW, dict(weight_decay=0.1)),
                                        (StableAdamW, dict(weight_decay=0.1, decoupled_wd=False)),
                                        (SPAM, dict(weight_decay=0.1, **TOY)),
                                        (SPAM, dict(weight_decay=0.1, decoupled_wd=False, **TOY))],
                         ids=lambda v: getattr(v, '__name__', str(v)))
@pytest.mark.parametrize('compile', [False, True])
def test_resume_bit_exact(cls, hypers, compile):
    params, noise = noise_sequence(45)
    ps = [p.float().clone().requires_grad_() for p in params]
    qs = [p.float().clone().requires_grad_() for p in params]
    a, b = cls(ps, lr=1e-2, compile=compile, **hypers), cls(qs, lr=1e-2, compile=compile, **hypers)
    for t, xi in enumerate(noise):
        if t == 17:  # saved after 17 steps; SPAM then resets at step 20 and warms up in the resumed part
            saved = copy.deepcopy(b.state_dict())
            qs = [q.detach().clone().requires_grad_() for q in qs]
            b = cls(qs, lr=1e-2, compile=compile, **hypers)
            b.load_state_dict(saved)
        for p, q, e in zip(ps, qs, xi):
            p.grad = (p.detach().double() + e).float()
            q.grad = (q.detach().double() + e).float()
        a.step(); b.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def test_bf16_step_leaves_the_gradient_alone():
    "pytorch-optimizer's StableAdamW (Kahan summation, on by default for bf16) writes into p.grad; ours must not"
    g = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.bfloat16)
    for make, keeps in ((StableAdamW, True), (pytorch_optimizer.StableAdamW, False)):
        p = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
        opt = make([p], lr=0.1)
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.grad, g) == keeps, make
        assert not torch.equal(p.detach(), torch.ones(4, dtype=torch.bfloat16))
