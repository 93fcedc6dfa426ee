"""The toolkit (nbs/50-54): gradient transforms, wrappers, PNM/AdaPNM/AdamS and schedules.

Against pytorch-optimizer 4.1 wherever it has the same function or wrapper (1e-5 absolute for optimizers in float32
over >= 50 steps, 1e-6 relative for the pure functions); else against a float64 transcription of the paper.
"""
from __future__ import annotations
import copy, io, math

import numpy as np
import pytest
import torch

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')
from pytorch_optimizer.lr_scheduler import chebyshev as peer_chebyshev
from pytorch_optimizer.optimizer.utils.gradient import unit_norm as peer_unit_norm

from optim_lab import load_optimizer
from optim_lab.checks import peer_check
from optim_lab.toolkit.transforms import (unit_norm, agc, centralize_gradient, centralize, rms_clip, norm_clip,
                                         normalize_gradient, norm_loss_grad)
from optim_lab.toolkit.wrappers import Lookahead, SAM, PCGrad, pcgrad_project
from optim_lab.toolkit.schedules import (linear_warmup, explore_exploit, get_chebyshev_perm_steps,
                                         get_chebyshev_schedule, get_chebyshev_steps, fastai_schedule)
from optim_lab.optimizers.pnm import PNM, AdaPNM, AdamS

torch.set_num_threads(1)
Adam = load_optimizer('Adam')
SHAPES = [(), (7,), (6, 4), (5, 3, 4), (4, 3, 2, 2), (3, 2, 2, 2, 2)]


def rel(a, b): return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item() if a.numel() else 0.0


def randn(shape, seed, dtype=torch.float32): return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# %% Gradient transforms

@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_unit_norm(shape):
    x = randn(shape, 0)
    u = unit_norm(x)
    if len(shape) <= 1: assert u.dim() == 0
    else: assert u.shape == (shape[0],) + (1,) * (len(shape) - 1)
    expected = x.norm() if len(shape) <= 1 else torch.stack([row.norm() for row in x]).reshape(u.shape)
    assert rel(u, expected) < 1e-6
    if len(shape) != 3: assert rel(u, peer_unit_norm(x)) < 1e-6   # 3-D: ours is over dims 1, 2 (a Conv1d unit)


@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('clip', [1e-2, 0.3])
def test_agc_matches_peer_and_returns_new(shape, clip):
    p, g = randn(shape, 1), randn(shape, 2) * 3
    if len(shape) > 1: p[0] = 0.0     # a zero unit: bound agc_eps * clip
    p0, g0 = p.clone(), g.clone()
    out = agc(p, g, agc_clip_val=clip)
    assert out is not g and torch.equal(p, p0) and torch.equal(g, g0)
    if len(shape) != 3: assert rel(out, pytorch_optimizer.agc(p, g, agc_clip_val=clip)) < 1e-6
    bound = clip * unit_norm(p).clamp_min(1e-3)
    assert (unit_norm(out) <= bound * (1 + 1e-5)).all()


def test_agc_float64_transcription():
    p, g = randn((5, 3, 4), 3, torch.float64), randn((5, 3, 4), 4, torch.float64)
    out = agc(p, g, agc_eps=1e-3, agc_clip_val=0.05, eps=1e-6)
    for i in range(5):
        w_norm, g_norm = p[i].norm().item(), g[i].norm().item()
        max_norm = 0.05 * max(w_norm, 1e-3)
        expected = g[i] * max_norm / max(g_norm, 1e-6) if g_norm > max_norm else g[i]
        assert rel(out[i], expected) < 1e-12


@pytest.mark.parametrize('conv_only', [False, True])
def test_centralize_gradient_in_place(conv_only):
    grads = [randn(s, i) + 2 for i, s in enumerate(SHAPES)]
    ours, peer, single = [g.clone() for g in grads], [g.clone() for g in grads], [g.clone() for g in grads]
    assert centralize_gradient(ours, gc_conv_only=conv_only) is None
    for g in single: assert centralize_gradient(g, gc_conv_only=conv_only) is None
    for g in peer: pytorch_optimizer.centralize_gradient(g, gc_conv_only=conv_only)
    for g0, a, b, c in zip(grads, ours, peer, single):
        assert (a - b).abs().max() <= 1e-6 * g0.abs().max() and torch.equal(a, c)   # float32 rounding of the means
        assert (g0.dim() > (3 if conv_only else 1)) != torch.equal(a, g0)


@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('kappa', [1.0, 0.3])
def test_centralize_out_of_place(shape, kappa):
    x = randn(shape, 7, torch.float64) + 2
    x0 = x.clone()
    out = centralize(x, kappa)
    expected = x0 - kappa * x0.reshape(x0.shape[0], -1).mean(dim=1).reshape((-1,) + (1,) * (x0.dim() - 1)) if x0.dim() > 1 else x0
    assert rel(out, expected) < 1e-12 and torch.equal(x, x0)


@pytest.mark.parametrize('shape', [(4, 7), (4, 8), (16, 8), (256, 256), (3, 18), (4, 3, 3, 3), (4, 3, 5)], ids=str)
def test_unit_mean_float32_against_float64(shape):
    "var_mean's mean (the toolkit's unit mean) against the float64 mean, relative to each unit's largest entry"
    x = randn(shape, 9) + 3
    dims = tuple(range(1, x.dim()))
    out = centralize(x, 1.0)
    expected = x.double() - x.double().mean(dim=dims, keepdim=True)
    assert ((out.double() - expected).abs() / x.abs().amax(dim=dims, keepdim=True)).max().item() < 1e-6


def centred_momentum_step(p, g, m, kappa):
    "The pattern of a centralising optimizer step: the centred gradient into a state buffer in place, then into p"
    c = g.clone()
    centralize_gradient(c)
    m.mul_(0.9).add_(centralize(g, kappa) + c, alpha=0.1)
    p.sub_(m)


@pytest.mark.parametrize('shape', [(4, 8), (16, 8), (3, 18), (4, 3, 3, 3)], ids=str)
def test_centralization_compiles_in_a_step(shape):
    """torch 2.14.1's inductor raised KeyError 'bufN' on this pattern when the unit mean came from `mean` and rows had
    >= 8 elements; compiled, it must run (fullgraph, the inductor backend) and agree with the eager step (float32)"""
    torch._dynamo.reset()
    p, g, m = randn(shape, 10), randn(shape, 11) + 1, randn(shape, 12)
    p_eager, m_eager = p.clone(), m.clone()
    centred_momentum_step(p_eager, g, m_eager, 0.5)
    torch.compile(centred_momentum_step, fullgraph=True)(p, g, m, 0.5)
    torch.testing.assert_close(m, m_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p, p_eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shape', SHAPES[1:], ids=str)
@pytest.mark.parametrize('clip', [0.05, 1.0, 50.0])
def test_rms_and_norm_clip_float64_transcription(shape, clip):
    x = randn(shape, 8, torch.float64) * 3
    x0 = x.clone()
    rms, norm = math.sqrt(sum(v * v for v in x.flatten().tolist()) / x.numel()), math.sqrt(sum(v * v for v in x.flatten().tolist()))
    assert rel(rms_clip(x, clip), x0 / max(1.0, rms / clip)) < 1e-12
    assert rel(norm_clip(x, clip), x0 / max(1.0, norm / clip)) < 1e-12
    assert torch.equal(x, x0)


@pytest.mark.parametrize('use_channels', [False, True])
@pytest.mark.parametrize('shape', [(1,), (2,), (3,), (9,), (5, 1), (5, 4), (4, 1, 1), (3, 2, 4), (3, 2, 2, 2)], ids=str)
def test_normalize_gradient_in_place(shape, use_channels):
    g = randn(shape, 5) * 4
    ours, peer = g.clone(), g.clone()
    assert normalize_gradient(ours, use_channels=use_channels) is None
    pytorch_optimizer.normalize_gradient(peer, use_channels=use_channels)
    assert torch.isfinite(ours).all() and rel(ours, peer) < 1e-6


@pytest.mark.parametrize('shape', SHAPES[1:], ids=str)
def test_norm_loss_grad_is_the_gradient(shape):
    w = randn(shape, 6, torch.float64).requires_grad_()
    (0.7 * ((1 - unit_norm(w)) ** 2).sum()).backward()
    w0 = w.detach().clone()
    out = norm_loss_grad(w.detach(), factor=0.7, eps=0.0)
    assert rel(out, w.grad) < 1e-12 and torch.equal(w.detach(), w0)
    if len(shape) != 3:   # the formula pytorch-optimizer's Ranger21 applies inline
        peer = 2 * 1e-4 * (1 - 1 / (peer_unit_norm(w0) + 1e-8)) * w0
        assert rel(norm_loss_grad(w0), peer) < 1e-12


# %% Lookahead

def _sgd(ps): return torch.optim.SGD(ps, lr=0.05, momentum=0.9)
def _adam(ps): return Adam(ps, lr=0.05)


@pytest.mark.parametrize('mode', ['none', 'reset', 'pullback'])
@pytest.mark.parametrize('k,alpha', [(5, 0.5), (3, 0.8)])
def test_lookahead_matches_peer_sgd(mode, k, alpha):
    dev = peer_check(lambda ps: Lookahead(_sgd(ps), k=k, alpha=alpha, pullback_momentum=mode),
                     lambda ps: pytorch_optimizer.Lookahead(_sgd(ps), k=k, alpha=alpha, pullback_momentum=mode), steps=100)
    assert dev < 1e-5, dev


def test_lookahead_matches_peer_adam():
    "With 'none' around Adam. (The peer's reset/pullback write a `momentum_buffer` Adam never reads; ours act on exp_avg.)"
    dev = peer_check(lambda ps: Lookahead(_adam(ps), k=4, alpha=0.6),
                     lambda ps: pytorch_optimizer.Lookahead(_adam(ps), k=4, alpha=0.6), steps=100)
    assert dev < 1e-5, dev


def _lookahead_reference(theta, grads, k, alpha, lr):
    "Float64: plain SGD fast weights, slow weights every k steps"
    slow, fast, out = theta.clone(), theta.clone(), []
    for t, g in enumerate(grads, 1):
        fast = fast - lr * (g + fast)
        if t % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
        out.append(fast)
    return out


def test_lookahead_float64_transcription():
    theta, grads = randn(6, 0, torch.float64), [randn(6, i, torch.float64) for i in range(1, 61)]
    p = theta.clone().requires_grad_()
    opt = Lookahead(torch.optim.SGD([p], lr=0.1), k=4, alpha=0.3)
    ref = _lookahead_reference(theta, grads, 4, 0.3, 0.1)
    for g, r in zip(grads, ref):
        p.grad = g + p.detach()
        opt.step()
        assert (p.detach() - r).abs().max() < 1e-12


def _roundtrip(sd):
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize('mode', ['none', 'pullback'])
@pytest.mark.parametrize('inner', [_sgd, _adam], ids=['SGD', 'Adam'])
def test_lookahead_state_dict_resumes_exactly(mode, inner):
    grads = [randn((4, 3), i) for i in range(20)]
    def run(p, opt, gs):
        for g in gs:
            p.grad = g + p.detach(); opt.step()
    p = randn((4, 3), 99).requires_grad_()
    opt = Lookahead(inner([p]), k=5, pullback_momentum=mode)
    run(p, opt, grads[:7])                      # mid-cycle
    saved_p, saved = p.detach().clone(), _roundtrip(opt.state_dict())
    run(p, opt, grads[7:])
    q = torch.zeros(4, 3).requires_grad_()
    fresh = Lookahead(inner([q]), k=5, pullback_momentum=mode)
    with torch.no_grad(): q.copy_(saved_p)
    fresh.load_state_dict(saved)
    run(q, fresh, grads[7:])
    assert torch.equal(p.detach(), q.detach())


def test_lookahead_is_the_inner_optimizer_for_schedulers_and_closures():
    w = torch.zeros(3, requires_grad=True)
    la = Lookahead(torch.optim.SGD([w], lr=0.1), k=2)
    assert isinstance(la, torch.optim.Optimizer) and la.param_groups is la.optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(la, step_size=1, gamma=0.5)
    def closure():
        la.zero_grad(); loss = (w - 1).pow(2).sum(); loss.backward(); return loss
    loss = la.step(closure); sched.step()
    assert loss.item() == 3.0 and la.optimizer.param_groups[0]['lr'] == 0.05
    la.add_param_group({'params': [torch.zeros(2, requires_grad=True)]})
    assert len(la.optimizer.param_groups) == 2
    la.step(closure)
    assert len(la.counters) == 2
    with pytest.raises(ValueError, match='alpha'): Lookahead(torch.optim.SGD([w], lr=0.1), alpha=1.5)
    with pytest.raises(ValueError, match='k=0'): Lookahead(torch.optim.SGD([w], lr=0.1), k=0)
    with pytest.raises(ValueError, match='pullback_momentum'): Lookahead(torch.optim.SGD([w], lr=0.1), pullback_momentum='x')


# %% SAM

def _closure_run(make, steps=60, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(3, 2, generator=gen, dtype=dtype).requires_grad_()
    target = torch.randn(8, generator=gen, dtype=dtype)
    opt = make([w, b])
    def closure():
        opt.zero_grad()
        loss = 0.25 * ((w - target) ** 4).sum() + (w ** 2).sum() + ((b - 1) ** 2).sum() * (1.5 + w.sum().tanh())
        loss.backward()
        return loss
    for _ in range(steps):
        closure()
        opt.step(closure)
    return torch.cat([w.detach().flatten(), b.detach().flatten()]), opt


BASES = [(torch.optim.SGD, dict(lr=0.01, momentum=0.9)), (torch.optim.AdamW, dict(lr=0.01))]


@pytest.mark.parametrize('adaptive,rho', [(False, 0.05), (True, 0.5)])
@pytest.mark.parametrize('base,kw', BASES, ids=['SGD', 'AdamW'])
def test_sam_matches_peer(adaptive, rho, base, kw):
    ours, _ = _closure_run(lambda ps: SAM(ps, base, rho=rho, adaptive=adaptive, **kw))
    theirs, _ = _closure_run(lambda ps: pytorch_optimizer.SAM(ps, base, rho=rho, adaptive=adaptive, foreach=False, **kw))
    assert (ours - theirs).abs().max().item() < 1e-5


def test_sam_use_gc_perturbs_along_the_centralized_gradient():
    """use_gc: ε̂ = ρ Φ(g)/‖Φ(g)‖ with Φ gradient centralization (in place on p.grad, as the peer). pytorch-optimizer
    divides Φ(g) by the norm of the *uncentralized* g, a perturbation shorter than ρ: we test against the transcription"""
    w = randn((4, 5), 1, torch.float64).requires_grad_()
    g = randn((4, 5), 2, torch.float64) + 1.0
    w.grad = g.clone()
    w0 = w.detach().clone()
    sam = SAM([w], torch.optim.SGD, rho=0.2, use_gc=True, lr=0.1)
    sam.first_step()
    c = g - g.mean(dim=1, keepdim=True)
    assert (w.detach() - (w0 + 0.2 * c / (c.norm() + 1e-12))).abs().max() < 1e-14
    assert abs((w.detach() - w0).norm().item() - 0.2) < 1e-12


@pytest.mark.parametrize('adaptive', [False, True])
def test_sam_perturbation_float64(adaptive):
    "first_step moves to w + ρ g/‖g‖ (SAM) or w + ρ w² g/‖|w| g‖ (ASAM), one norm over all parameters"
    ws = [randn((4, 3), 1, torch.float64).requires_grad_(), randn(5, 2, torch.float64).requires_grad_()]
    gs = [randn((4, 3), 3, torch.float64), randn(5, 4, torch.float64)]
    for w, g in zip(ws, gs): w.grad = g.clone()
    w0 = [w.detach().clone() for w in ws]
    sam = SAM(ws, torch.optim.SGD, rho=0.3, adaptive=adaptive, lr=0.1)
    sam.first_step()
    scaled = [g * w.abs() if adaptive else g for w, g in zip(w0, gs)]
    norm = math.sqrt(sum((s ** 2).sum().item() for s in scaled))
    for w, w_, g in zip(ws, w0, gs):
        e = 0.3 * (w_ ** 2 if adaptive else 1) * g / (norm + 1e-12)
        assert (w.detach() - (w_ + e)).abs().max() < 1e-14
    sam.second_step()
    for w, w_, g in zip(ws, w0, gs): assert (w.detach() - (w_ - 0.1 * g)).abs().max() < 1e-14


def test_sam_without_closure_raises_and_changes_nothing():
    w = torch.ones(3, requires_grad=True); w.grad = torch.full((3,), 2.0)
    sam = SAM([w], Adam, lr=0.1)
    with pytest.raises(ValueError, match='closure'): sam.step()
    assert torch.equal(w.detach(), torch.ones(3)) and torch.equal(w.grad, torch.full((3,), 2.0))
    assert not sam.base_optimizer.state


@pytest.mark.parametrize('base,kw', [(Adam, dict(lr=0.01)), (torch.optim.SGD, dict(lr=0.01, momentum=0.9))], ids=['Adam', 'SGD'])
def test_sam_state_dict_resumes_exactly(base, kw):
    ref, opt = _closure_run(lambda ps: SAM(ps, base, rho=0.1, **kw), steps=30)
    mid, opt_mid = _closure_run(lambda ps: SAM(ps, base, rho=0.1, **kw), steps=18)
    saved = _roundtrip(opt_mid.state_dict())
    weights = [p.detach().clone() for p in opt_mid.param_groups[0]['params']]
    # a fresh SAM on fresh parameters, loaded, continues for the remaining 12 steps
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=gen).requires_grad_(); b = torch.randn(3, 2, generator=gen).requires_grad_()
    target = torch.randn(8, generator=gen)
    with torch.no_grad(): w.copy_(weights[0]); b.copy_(weights[1])
    fresh = SAM([w, b], base, rho=0.1, **kw)
    fresh.load_state_dict(saved)
    def closure():
        fresh.zero_grad()
        loss = 0.25 * ((w - target) ** 4).sum() + (w ** 2).sum() + ((b - 1) ** 2).sum() * (1.5 + w.sum().tanh())
        loss.backward(); return loss
    for _ in range(12):
        closure(); fresh.step(closure)
    assert torch.equal(torch.cat([w.detach().flatten(), b.detach().flatten()]), ref)


def _two_wells(w):
    return -1.5 * torch.exp(-(w + 1) ** 2 / (2 * 0.15 ** 2)) - torch.exp(-(w - 1.5) ** 2 / (2 * 0.8 ** 2)) + 0.02 * w ** 2


@pytest.mark.parametrize('w0', [-1.3, -1.15, -0.9, -0.8, -0.7])
def test_sam_prefers_the_flat_minimum(w0):
    "Momentum SGD stays in the deep sharp well; SAM around the same SGD ends in the wide one (chapter 51's plot)"
    ends = []
    for use_sam in (False, True):
        w = torch.tensor([w0], dtype=torch.float64, requires_grad=True)
        opt = SAM([w], torch.optim.SGD, rho=0.15, lr=0.02, momentum=0.9) if use_sam else torch.optim.SGD([w], lr=0.02, momentum=0.9)
        def closure():
            opt.zero_grad(); loss = _two_wells(w).sum(); loss.backward(); return loss
        for _ in range(600):
            closure()
            opt.step(closure) if use_sam else opt.step()
        ends.append(w.item())
    assert abs(ends[0] + 1) < 0.05, ends
    assert abs(ends[1] - 1.5) < 0.3, ends


# %% PCGrad

def test_pcgrad_opposite_gradients_give_zero_not_nan():
    for scale in (1.0, 1e-30, 0.0):
        g = randn(50, 0) * scale
        out = pcgrad_project([g, -g])
        assert all(torch.isfinite(x).all() for x in out)
        assert torch.equal(out[0] + out[1], torch.zeros(50))
    w = torch.randn(5, requires_grad=True)
    pc = PCGrad(torch.optim.SGD([w], lr=0.1), reduction='sum')
    pc.pc_backward([(w ** 2).sum(), -(w ** 2).sum()])
    assert torch.equal(w.grad, torch.zeros(5))


def _two_task_run(make_pc, steps=50, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    pc = make_pc(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    for _ in range(steps):
        out = net(x)
        losses = [((out[:, 0] - y[:, 0]) ** 2).mean(), ((out[:, 1] + out[:, 0] - y[:, 1]) ** 2).mean()]
        pc.zero_grad()
        pc.pc_backward(losses)
        pc.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_pcgrad_matches_peer(reduction):
    "Two tasks reaching every parameter: the random order does not matter, and both 'mean's agree"
    dev = (_two_task_run(lambda o: PCGrad(o, reduction)) - _two_task_run(lambda o: pytorch_optimizer.PCGrad(o, reduction))).abs().max()
    assert dev < 1e-5


def _pcgrad_reference(grads, order):
    "Float64 transcription of the paper: g_i projected off each conflicting original g_j, j in `order[i]`"
    out = []
    for i, g_i in enumerate(grads):
        g = g_i.clone()
        for j in order[i]:
            if j == i: continue
            if torch.dot(g, grads[j]) < 0: g = g - torch.dot(g, grads[j]) / torch.dot(grads[j], grads[j]) * grads[j]
        out.append(g)
    return out


def test_pcgrad_three_tasks_float64():
    grads = [randn(30, i, torch.float64) for i in range(3)]
    grads[2] = -0.7 * grads[0] + 0.3 * grads[2]   # conflicts
    gen = torch.Generator().manual_seed(5)
    ours = pcgrad_project(grads, gen)
    gen = torch.Generator().manual_seed(5)
    order = [torch.randperm(3, generator=gen).tolist() for _ in range(3)]
    for a, b in zip(ours, _pcgrad_reference(grads, order)): assert (a - b).abs().max() < 1e-12
    for i, g in enumerate(ours):   # after projection no g_i^PC conflicts with the g_j projected last
        assert torch.dot(g, grads[[j for j in order[i] if j != i][-1]]) > -1e-12


def test_pcgrad_mean_is_sum_over_n_and_unreached_params_have_no_grad():
    a, b, unused = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    objectives = lambda: [(a ** 2).sum() + b.sum(), -(a * b[0]).sum(), (b ** 3).sum()]
    grads = {}
    for reduction in ('mean', 'sum'):
        pc = PCGrad(torch.optim.SGD([a, b, unused], lr=0.1), reduction)
        torch.manual_seed(0)
        pc.pc_backward(objectives())
        grads[reduction] = (a.grad.clone(), b.grad.clone())
        assert unused.grad is None
    for m, s in zip(*grads.values()): assert torch.allclose(m * 3, s, atol=1e-6)
    with pytest.raises(ValueError, match='reduction'): PCGrad(torch.optim.SGD([a], lr=0.1), 'max')


# %% PNM, AdaPNM, AdamS against pytorch-optimizer

PNM_SETTINGS = [dict(lr=1e-2), dict(lr=1e-2, betas=(0.9, 0.5), weight_decay=0.1),
                dict(lr=3e-2, betas=(0.8, 0.7), weight_decay=0.01, maximize=True)]  # the peer refuses beta0 > 1


@pytest.mark.parametrize('hypers', PNM_SETTINGS, ids=str)
def test_pnm_matches_peer(hypers):
    dev = peer_check(lambda ps: PNM(ps, **hypers), lambda ps: pytorch_optimizer.PNM(ps, foreach=False, **hypers), steps=100)
    assert dev < 1e-5, dev


ADAPNM_SETTINGS = [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, amsgrad=False),
                   dict(lr=1e-2, betas=(0.8, 0.99, 0.5), eps=1e-6, weight_decay=0.1, maximize=True)]


@pytest.mark.parametrize('hypers', ADAPNM_SETTINGS, ids=str)
def test_adapnm_matches_peer(hypers):
    "The peer adds eps before dividing by sqrt(1 - beta2^t) (and 1e-15 under the root): an O(eps) difference"
    theirs = dict(hypers); theirs['ams_bound'] = theirs.pop('amsgrad', True)
    dev = peer_check(lambda ps: AdaPNM(ps, **hypers), lambda ps: pytorch_optimizer.AdaPNM(ps, foreach=False, **theirs), steps=100)
    assert dev < 1e-5, dev


def test_adapnm_accepts_ams_bound():
    assert AdaPNM([torch.zeros(1, requires_grad=True)], ams_bound=False).defaults['amsgrad'] is False


ADAMS_SETTINGS = [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.5), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                  dict(lr=1e-2, weight_decay=0.1, maximize=True)]


@pytest.mark.parametrize('hypers', ADAMS_SETTINGS, ids=str)
def test_adams_matches_peer(hypers):
    dev = peer_check(lambda ps: AdamS(ps, **hypers), lambda ps: pytorch_optimizer.AdamS(ps, foreach=False, **hypers), steps=100)
    assert dev < 1e-5, dev


def _multi_param_run(make, groups, steps=60):
    params = [randn(s, i) .requires_grad_() for i, s in enumerate([(6, 5), (5,), (3, 2, 2, 2)])]
    opt = make([{'params': params[:2], **groups[0]}, {'params': params[2:], **groups[1]}])
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params: p.grad = p.detach() + torch.randn(p.shape, generator=gen)
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


def test_adams_one_mean_over_all_groups_matches_peer():
    groups = [dict(weight_decay=0.5), dict(weight_decay=0.0)]
    ours = _multi_param_run(lambda g: AdamS(g, lr=1e-2), groups)
    theirs = _multi_param_run(lambda g: pytorch_optimizer.AdamS(g, lr=1e-2, foreach=False), groups)
    assert (ours - theirs).abs().max() < 1e-5


def _compiled_vs_eager(cls, steps=20, **hypers):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(6, 5), (5,), (3, 2, 3, 3)]]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    a, b = cls(ps, compile=True, **hypers), cls(qs, **hypers)
    for _ in range(steps):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=gen); p.grad, q.grad = g.clone(), g.clone()
        a.step(); b.step()
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(ps, qs))


@pytest.mark.parametrize('cls,hypers', [(PNM, dict(lr=1e-2, weight_decay=0.1)), (AdaPNM, dict(lr=1e-2, weight_decay=0.1)),
                                        (AdaPNM, dict(lr=1e-2, amsgrad=False, decoupled_wd=False, weight_decay=0.1)),
                                        (AdamS, dict(lr=1e-2, weight_decay=0.5)),
                                        (AdamS, dict(lr=1e-2, weight_decay=0.1, decoupled_wd=False))], ids=str)
def test_compiled_matches_eager(cls, hypers):
    from torch._dynamo.utils import counters
    counters.clear()
    assert _compiled_vs_eager(cls, **hypers) < 1e-5
    assert counters['stats']['unique_graphs'] == 1   # the swap and AdamS's mean do not recompile


# %% Schedules

def test_linear_warmup():
    f = linear_warmup(10)
    assert [f(s) for s in range(12)] == [min(1.0, (s + 1) / 10) for s in range(12)]
    for beta2 in (0.99, 0.999):
        g = linear_warmup(beta2=beta2)
        for s in (0, 10, 150, 1999, 5000): assert abs(g(s) - min(1.0, (s + 1) * (1 - beta2) / 2)) < 1e-15
    with pytest.raises(ValueError): linear_warmup(-3)
    with pytest.raises(ValueError): linear_warmup(beta2=1.0)


@pytest.mark.parametrize('T,E,W', [(100, 50, 10), (100, 0, 0), (50, 40, 10), (30, 10, 0)])
def test_explore_exploit(T, E, W):
    f = explore_exploit(T, E, W)
    for s in range(T + 5):
        t = s + 1
        expected = t / W if t <= W else 1.0 if t <= W + E else max(0.0, 1 - (t - W - E) / (T - W - E)) if T > W + E else 0.0
        assert abs(f(s) - expected) < 1e-15
    assert f(T - 1) == 0.0 or T == W + E


@pytest.mark.parametrize('T', [8, 16, 32, 64])
def test_chebyshev_matches_peer_for_powers_of_two(T):
    assert np.allclose(get_chebyshev_steps(T), peer_chebyshev.get_chebyshev_steps(T), rtol=1e-12, atol=0)
    assert np.allclose(get_chebyshev_perm_steps(T), peer_chebyshev.get_chebyshev_perm_steps(T), rtol=1e-12, atol=0)


@pytest.mark.parametrize('T', [1, 2, 3, 4, 5, 7, 12, 16])
def test_chebyshev_perm_steps_are_all_the_nodes(T):
    steps = get_chebyshev_perm_steps(T)
    gamma = 0.525 - 0.475 * np.cos((np.arange(T) + 0.5) * np.pi / T)
    assert len(steps) == T and np.allclose(np.sort(steps), np.sort(1 / gamma), rtol=1e-12)


def test_chebyshev_fractal_order_and_schedule():
    perm = [int(np.argmin(np.abs(get_chebyshev_steps(16) - s))) for s in get_chebyshev_perm_steps(16)]
    sigma = [0]
    while len(sigma) < 16: sigma = [x for a in sigma for x in (a, 2 * len(sigma) - 1 - a)]
    assert perm == sigma
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.2)
    sched = get_chebyshev_schedule(opt, 16)
    steps = get_chebyshev_perm_steps(16)
    for e in range(20):
        assert abs(opt.param_groups[0]['lr'] - 0.2 * steps[min(e, 15)]) < 1e-12   # epoch e uses step e (not e - 2)
        opt.step(); sched.step()
    opt = torch.optim.SGD([w], lr=0.2)
    get_chebyshev_schedule(opt, 16, is_warmup=True)
    assert opt.param_groups[0]['lr'] == 0.2


def test_fastai_schedule():
    f = explore_exploit(40, 20, 5)
    h = fastai_schedule(f, 40, base=0.1)
    assert [h(s / 40) for s in range(40)] == [0.1 * f(s) for s in range(40)]
