"""FAdam, ADOPT, MARS and cautious stepping (chapters 40-43) against pytorch-optimizer 4.1.

Both sides get the same parameters (several shapes, in one optimizer) and the same gradients g_t = theta_{t-1} + noise_t
for 100 steps in float32, with identical explicit settings; every iterate must agree to 1e-5. Where the peer deviates
(MARS's L2 decay, MARS-Lion's cautious mask) the comparison is against a float64 transcription of the equations, and
the comment says why. Then cautious stepping itself, and each optimizer's compiled step against its eager step.
"""
from __future__ import annotations
import re
import math

import pytest
import torch
from peer_versions import peer_is

from optim_lab import load_optimizer
from histories import run, assert_close_histories
from optim_lab.toolkit.cautious import cautious, cautious_

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')


def compare(name, ours: dict, peer_cls, theirs: dict):
    cls = load_optimizer(name)
    return assert_close_histories(run(lambda ps: cls(ps, **ours)), run(lambda ps: peer_cls(ps, **theirs)),
                                  f'{name}{ours} vs {peer_cls.__name__}{theirs}')


# %% FAdam: the peer follows the paper (its adaptive eps is the meaning of our `eps_2`)

FADAM_SETTINGS = [
    (dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, clip=1.0, p=0.5, eps=1e-8, eps_2=0.01),) * 2,
    (dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.5, clip=0.5, p=0.25, eps=1e-3, eps_2=1e-4),) * 2,
    (dict(lr=1e-2, weight_decay=0.0, clip=2.0, maximize=True),) * 2,
]

@pytest.mark.parametrize('ours,theirs', FADAM_SETTINGS, ids=str)
def test_fadam_vs_pytorch_optimizer(ours, theirs):
    compare('FAdam', ours, pytorch_optimizer.FAdam, theirs)


# %% ADOPT

ADOPT_SETTINGS = [  # (ours, the peer's): decoupled decay is their `weight_decouple`
    (dict(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6), dict(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6)),
    (dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, decoupled_wd=False, eps=1e-4),
     dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, weight_decouple=False, eps=1e-4)),
    (dict(lr=3e-2, weight_decay=0.2, decoupled_wd=True, clip_lambda=lambda s: 0.5 * s ** 0.5),
     dict(lr=3e-2, weight_decay=0.2, weight_decouple=True, clip_lambda=lambda s: 0.5 * s ** 0.5)),
    (dict(lr=1e-2, clip_lambda=None, maximize=True), dict(lr=1e-2, clip_lambda=None, maximize=True)),
    # cautious: the peer masks the step m_t against g_t (the sign of its normalised gradient is g_t's)
    (dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True, cautious=True),
     dict(lr=1e-2, weight_decay=0.1, weight_decouple=True, cautious=True)),
    (dict(lr=1e-2, betas=(0.5, 0.9), cautious=True), dict(lr=1e-2, betas=(0.5, 0.9), cautious=True)),
]

@pytest.mark.parametrize('ours,theirs', ADOPT_SETTINGS, ids=lambda v: re.sub(r' at 0x[0-9a-f]+', '', str(v)))  # the same ids in every process
def test_adopt_vs_pytorch_optimizer(ours, theirs):
    compare('ADOPT', ours, pytorch_optimizer.ADOPT, theirs)


def test_adopt_first_step_only_initialises_v():
    p = torch.ones(3, requires_grad=True)
    opt = load_optimizer('ADOPT')([p], lr=1.0)
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    assert torch.equal(opt.state[p]['exp_avg_sq'], torch.tensor([1.0, 4.0, 9.0]))


# %% MARS

MARS_SETTINGS = [  # the peer's lr_1d is lr_1d/lr times lr: the same here as no schedule runs
    (dict(lr=1e-2, lr_1d=1e-2, gamma=0.025), dict(lr=1e-2, lr_1d=1e-2, gamma=0.025)),
    (dict(lr=1e-2, lr_1d=3e-3, betas=(0.9, 0.99), betas_1d=(0.8, 0.9), gamma=0.2, weight_decay=0.1,
          weight_decay_1d=0.3, ams_bound=True, eps=1e-6),
     dict(lr=1e-2, lr_1d=3e-3, betas=(0.9, 0.99), betas_1d=(0.8, 0.9), gamma=0.2, weight_decay=0.1,
          weight_decay_1d=0.3, ams_bound=True, eps=1e-6)),
    (dict(lr=3e-3, mars_type='lion', gamma=0.1, weight_decay=0.5), dict(lr=3e-3, mars_type='lion', gamma=0.1, weight_decay=0.5)),
    (dict(lr=1e-2, optimize_1d=True, maximize=True), dict(lr=1e-2, optimize_1d=True, maximize=True)),
    # cautious AdamW-type: the peer masks m before dividing by the (positive) denominator: the same mask and scale
    (dict(lr=1e-2, lr_1d=1e-2, gamma=0.1, cautious=True), dict(lr=1e-2, lr_1d=1e-2, gamma=0.1, cautious=True)),
    (dict(lr=1e-2, optimize_1d=True, weight_decay=0.1, cautious=True),
     dict(lr=1e-2, optimize_1d=True, weight_decay=0.1, cautious=True)),
]

@pytest.mark.parametrize('ours,theirs', MARS_SETTINGS, ids=str)
def test_mars_vs_pytorch_optimizer(ours, theirs):
    compare('MARS', ours, pytorch_optimizer.MARS, theirs)


def mars_reference(theta, grads, lr, betas, gamma, mars_type, eps=1e-8, weight_decay=0.0, decoupled_wd=True,
                   cautious=False):
    "The paper's MARS on a 2-D tensor in float64: L2 added before everything, the cautious mask on the final u_t"
    beta1, beta2 = betas
    m, v, g_prev = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    out = []
    for t, g in enumerate(grads, 1):
        if decoupled_wd: theta = (1 - lr * weight_decay) * theta
        else: g = g + weight_decay * theta
        c = g + gamma * beta1 / (1 - beta1) * (g - g_prev)
        c = c / max(1.0, torch.sqrt((c * c).sum()).item())
        g_prev = g
        m = beta1 * m + (1 - beta1) * c
        if mars_type == 'lion': u = torch.sign(m)
        else:
            v = beta2 * v + (1 - beta2) * c * c
            u = (m / (1 - beta1 ** t)) / ((torch.sqrt(v) + eps) / math.sqrt(1 - beta2 ** t))
        if cautious:
            phi = (u * g > 0).double()
            u = u * phi * u.numel() / (phi.sum() + 1)
        theta = theta - lr * u
        out.append(theta)
    return out


@pytest.mark.parametrize('hypers', [
    # pytorch-optimizer applies no L2 decay when weight_decouple=False (it adds lambda*theta to the gradient after
    # computing the update): ours adds it first, so compare to the float64 transcription
    dict(lr=1e-2, betas=(0.9, 0.99), gamma=0.1, mars_type='adamw', weight_decay=0.3, decoupled_wd=False),
    dict(lr=1e-2, betas=(0.95, 0.99), gamma=0.025, mars_type='lion', weight_decay=0.3, decoupled_wd=False),
    # pytorch-optimizer's cautious MARS-Lion masks m and then takes the sign, losing the rescale; ours masks sign(m)
    dict(lr=1e-2, betas=(0.95, 0.99), gamma=0.1, mars_type='lion', cautious=True),
    dict(lr=1e-2, betas=(0.9, 0.95), gamma=0.1, mars_type='lion', weight_decay=0.5, cautious=True),
], ids=str)
def test_mars_vs_float64_transcription(hypers):
    gen = torch.Generator().manual_seed(3)
    theta0 = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 6, generator=gen, dtype=torch.float64) for _ in range(60)]
    p = theta0.clone().float().requires_grad_()
    opt = load_optimizer('MARS')([p], **hypers)
    ours = []
    for g in grads:
        p.grad = g.float()
        opt.step()
        ours.append(p.detach().double().clone())
    ref = mars_reference(theta0, grads, **hypers)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    assert worst < 1e-5, f'MARS {hypers}: max |diff| {worst:.2e} against the float64 transcription'
    assert (ours[-1] - theta0).abs().max() > 1e-2


def test_mars_peer_l2_is_not_l2():
    "The deviation named above really exists: the peer's weight_decouple=False run ignores the decay in its step"
    a = run(lambda ps: pytorch_optimizer.MARS(ps, lr=1e-2, weight_decay=0.5, weight_decouple=False), shapes=[(4, 5)])
    b = run(lambda ps: load_optimizer('MARS')(ps, lr=1e-2, weight_decay=0.5, decoupled_wd=False), shapes=[(4, 5)])
    if peer_is('pytorch_optimizer'): assert (a[-1][0] - b[-1][0]).abs().max() > 1e-2


# %% Cautious stepping

LION_SETTINGS = [
    (dict(lr=1e-2, betas=(0.9, 0.99), cautious=True), dict(lr=1e-2, betas=(0.9, 0.99), cautious=True)),
    (dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5, decoupled_wd=True, cautious=True),
     dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5, weight_decouple=True, cautious=True)),
    (dict(lr=1e-2, weight_decay=0.1, decoupled_wd=False, cautious=True),
     dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, cautious=True)),
]

@pytest.mark.parametrize('ours,theirs', LION_SETTINGS, ids=str)
def test_cautious_lion_vs_pytorch_optimizer(ours, theirs):
    compare('Lion', ours, pytorch_optimizer.Lion, theirs)


def test_cautious_transform():
    u = torch.tensor([1.0, -2.0, 3.0, -4.0])
    g = torch.tensor([0.5, 1.0, -1.0, -2.0])
    torch.testing.assert_close(cautious(u, g), torch.tensor([4 / 3, 0.0, 0.0, -16 / 3]))
    assert torch.equal(u, torch.tensor([1.0, -2.0, 3.0, -4.0]))      # cautious() copies
    out = cautious_(u, g)
    assert out is u and torch.equal(u, torch.tensor([4 / 3, 0.0, 0.0, -16 / 3]))
    assert torch.equal(cautious(torch.ones(3), -torch.ones(3)), torch.zeros(3))
    assert torch.equal(cautious(torch.ones(()), torch.ones(())), torch.ones(()) / 2)  # 0-d: numel 1, kept 1


def test_cautious_transform_compiles():
    f = torch.compile(cautious, fullgraph=True)
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(f(x, y), cautious(x, y))


def test_cautious_off_is_the_plain_rule():
    for name, kw in (('Lion', {}), ('ADOPT', {}), ('MARS', {'lr_1d': 1e-2}), ('Adam', {}), ('AdamW', {})):
        cls = load_optimizer(name)
        a = run(lambda ps: cls(ps, lr=1e-2, **kw), steps=20)
        b = run(lambda ps: cls(ps, lr=1e-2, cautious=False, **kw), steps=20)
        c = run(lambda ps: cls(ps, lr=1e-2, cautious=True, **kw), steps=20)
        assert all(torch.equal(x, y) for x, y in zip(a[-1], b[-1]))
        assert any(not torch.equal(x, y) for x, y in zip(a[-1], c[-1])), name


# %% Compiled against eager (the compile contract covers the defaults; these cover the options)

@pytest.mark.parametrize('name,hypers', [
    ('FAdam', dict(lr=1e-2, clip=0.5, p=0.25)),
    ('ADOPT', dict(lr=1e-2, cautious=True, weight_decay=0.1)),
    ('MARS', dict(lr=1e-2, mars_type='lion', cautious=True, weight_decay=0.1, decoupled_wd=False)),
    ('MARS', dict(lr=1e-2, ams_bound=True, optimize_1d=True, cautious=True)),
    ('Lion', dict(lr=1e-2, cautious=True)),
    ('Adam', dict(lr=1e-2, cautious=True, weight_decay=0.1, amsgrad=True)),
    ('AdamW', dict(lr=1e-2, cautious=True)),
], ids=str)
def test_compiled_matches_eager(name, hypers):
    cls = load_optimizer(name)
    shapes = [(7, 5), (5,), (3, 2, 3, 3)]
    eager = run(lambda ps: cls(ps, **hypers), steps=20, shapes=shapes)
    compiled = run(lambda ps: cls(ps, compile=True, **hypers), steps=20, shapes=shapes)
    for a, b in zip(eager[-1], compiled[-1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# %% Cautious Adam and AdamW against the paper (Liang et al. 2024, C-AdamW), transcribed in float64

def cautious_adam_reference(theta, grad_fn, steps, lr, betas, eps, weight_decay=0.0, decoupled_wd=False, cautious=True):
    "Adam/AdamW on one tensor, u_t masked by 1[u_t g_t > 0] and rescaled by d / (kept + 1); decoupled decay unmasked"
    beta1, beta2 = betas
    m, v, iterates = torch.zeros_like(theta), torch.zeros_like(theta), [theta]
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        if decoupled_wd: theta = theta * (1 - lr * weight_decay)
        else: g = g + weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g ** 2
        u = (m / (1 - beta1 ** t)) / (torch.sqrt(v / (1 - beta2 ** t)) + eps)
        if cautious:
            keep = (u * g > 0).double()
            u = u * keep * (keep.numel() / (keep.sum() + 1))
        theta = theta - lr * u
        iterates.append(theta)
    return iterates


@pytest.mark.parametrize('name,hypers', [
    ('Adam', dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)),
    ('Adam', dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ('AdamW', dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5)),
    ('AdamW', dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.1)),
], ids=str)
def test_cautious_adam_vs_float64_transcription(name, hypers):
    gen = torch.Generator().manual_seed(3)
    theta0 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    noises = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(60)]
    grad_fn = lambda theta, t: theta + noises[t - 1]
    wd = dict(decoupled_wd=True) if name == 'AdamW' else {}
    expected = cautious_adam_reference(theta0, grad_fn, 60, **hypers, **wd)
    uncautious = cautious_adam_reference(theta0, grad_fn, 60, **hypers, **wd, cautious=False)
    assert (expected[-1] - uncautious[-1]).abs().max() > 1e-3, 'the mask changed nothing: the test would be vacuous'
    p = theta0.clone().requires_grad_()
    opt = load_optimizer(name)([p], cautious=True, **hypers)
    for t in range(1, 61):
        p.grad = grad_fn(p.detach(), t)
        opt.step()
        torch.testing.assert_close(p.detach(), expected[t], rtol=1e-12, atol=1e-12, msg=f'{name} step {t}')
