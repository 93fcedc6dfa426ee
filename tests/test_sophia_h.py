"""SophiaH (nbs/78_sophia_h.ipynb): Hutchinson's estimator, a float64 transcription of the paper's Algorithm 3 (in its own
η, γ, ε), pytorch-optimizer 4.1 where it is right, its maximize deviation, resuming the probe sequence through
state_dict, and the refusals (no graph, compile=True, DTensor)."""
from __future__ import annotations
import io, math, warnings

import pytest
import torch

from optim_lab.optimizers.sophia_h import SophiaH, hutchinson_diagonal, sophia_h_update
from optim_lab.optimizers import adahessian

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')
pytestmark = pytest.mark.filterwarnings('ignore:Using backward\\(\\) with create_graph=True')
DT = torch.float64


def _problem(shapes, steps, seed):
    "f_t(θ) = ½ xᵀAx + ¼ Σ x⁴ + ξ_tᵀx, x all the parameters concatenated (A full: the parameters are coupled)"
    gen = torch.Generator().manual_seed(seed)
    n = sum(math.prod(s) for s in shapes)
    M = torch.randn(n, n, generator=gen, dtype=DT) / n ** 0.5
    A = M @ M.T + 0.1 * torch.eye(n, dtype=DT)
    xi = [torch.randn(n, generator=gen, dtype=DT) for _ in range(steps)]
    start = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    def loss(params, t):
        x = torch.cat([q.reshape(-1) for q in params])
        return 0.5 * x @ A @ x + 0.25 * (x ** 4).sum() + xi[t - 1] @ x
    return start, loss, A


def _run(make, start, loss, steps, first=1, opt=None, params=None):
    ps = params if params is not None else [q.clone().requires_grad_() for q in start]
    opt = opt if opt is not None else make(ps)
    for t in range(first, first + steps):
        opt.zero_grad()
        loss(ps, t).backward(create_graph=True)
        opt.step()
    return ps, opt


def _flat(ps): return torch.cat([q.detach().reshape(-1) for q in ps])


def _reference(start, loss, steps, seed, lr=6e-2, betas=(0.96, 0.99), weight_decay=0.0, decoupled_wd=True, p=1e-2,
               update_period=10, num_samples=1, hessian_distribution='gaussian', eps=1e-12, maximize=False):
    "Algorithm 3 with η = lr·p, γ = p, ε = eps·p; exact Hessian; probes drawn per sample, parameter after parameter"
    eta, gamma, epsilon = lr * p, p, eps * p
    shapes, sizes = [q.shape for q in start], [q.numel() for q in start]
    gen = torch.Generator().manual_seed(seed)
    def probe():
        if hessian_distribution == 'gaussian': parts = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
        else: parts = [torch.randint(0, 2, s, generator=gen, dtype=DT) * 2 - 1 for s in shapes]
        return torch.cat([q.reshape(-1) for q in parts])
    sign = -1.0 if maximize else 1.0
    L = lambda y, t: sign * loss([c.reshape(s) for c, s in zip(y.split(sizes), shapes)], t)
    x = torch.cat([q.reshape(-1) for q in start])
    m, h = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(1, steps + 1):
        g = torch.func.grad(L)(x, t)
        if (t - 1) % update_period == 0:
            H = torch.autograd.functional.hessian(lambda y: L(y, t), x)
            h_hat = sum(z * (H @ z) for z in (probe() for _ in range(num_samples))) / num_samples
            h = betas[1] * h + (1 - betas[1]) * h_hat
        if decoupled_wd: x = x * (1 - eta / gamma * weight_decay)
        else: g = g + weight_decay * x
        m = betas[0] * m + (1 - betas[0]) * g
        x = x - eta * (m / torch.clamp(gamma * h, min=epsilon)).clamp(-1, 1)
    return x


SHAPES = [(5,), (3, 4), (2, 1, 2, 2)]
SETTINGS = [dict(), dict(lr=0.5, p=0.05, update_period=3, num_samples=3, hessian_distribution='rademacher'),
            dict(lr=0.3, p=1.0, betas=(0.9, 0.6), weight_decay=0.2, update_period=1),
            dict(lr=0.3, p=0.5, betas=(0.8, 0.7), weight_decay=0.1, decoupled_wd=False, update_period=4, eps=1e-3)]


@pytest.mark.parametrize('hypers', SETTINGS + [dict(lr=0.3, p=1.0, betas=(0.9, 0.6), maximize=True, update_period=2)], ids=str)
def test_against_float64_transcription(hypers):
    "42 steps on a vector, a matrix and a 4-d kernel, coupled; maximize=True maximises -f (descends f)"
    start, loss, _ = _problem(SHAPES, 42, seed=3)
    if hypers.get('maximize'): loss = lambda ps, t, f=loss: -f(ps, t)
    ours, _ = _run(lambda ps: SophiaH(ps, seed=5, **hypers), start, loss, 42)
    ref = _reference(start, loss, 42, seed=5, **hypers)
    moved = (ref - torch.cat([q.reshape(-1) for q in start])).abs().max()
    assert moved > 1e-3                                            # the check is not vacuous
    assert (_flat(ours) - ref).abs().max() < 1e-12                 # float64 rounding over 42 steps


@pytest.mark.parametrize('foreach', [False, True])
@pytest.mark.parametrize('hypers', SETTINGS, ids=str)
def test_matches_peer(hypers, foreach):
    "seed=None draws from torch's global generator as the peer does: the same z from the same torch.manual_seed"
    start, loss, _ = _problem(SHAPES, 42, seed=4)
    peer_h = {('weight_decouple' if k == 'decoupled_wd' else k): v for k, v in hypers.items()}
    torch.manual_seed(11)
    ours, _ = _run(lambda ps: SophiaH(ps, **hypers), start, loss, 42)
    torch.manual_seed(11)
    peer, _ = _run(lambda ps: pytorch_optimizer.SophiaH(ps, foreach=foreach, **peer_h), start, loss, 42)
    assert (_flat(ours) - _flat(peer)).abs().max() < 1e-12


def test_maximize_uses_the_hessian_of_minus_f_unlike_the_peer():
    "Maximising f near its maximum: ours divides by the curvature of -f (> 0), the peer by that of f (< 0, floored)"
    bowl = torch.tensor([0.5, 2.0], dtype=DT)
    def run(make):
        th = torch.tensor([0.93, -0.71], dtype=DT, requires_grad=True)
        opt = make([th])
        for _ in range(60):
            opt.zero_grad(); (-0.5 * (bowl * th ** 2).sum()).backward(create_graph=True); opt.step()
        return th.detach(), opt.state[th]['hessian_moment']
    hy = dict(lr=0.5, p=1.0, betas=(0.5, 0.6), update_period=1, hessian_distribution='rademacher', maximize=True)
    ours, h = run(lambda ps: SophiaH(ps, **hy))
    peer, peer_h = run(lambda ps: pytorch_optimizer.SophiaH(ps, foreach=False, **hy))
    torch.testing.assert_close(h, bowl, rtol=1e-6, atol=0)
    torch.testing.assert_close(peer_h, -bowl, rtol=1e-6, atol=0)
    assert ours.norm() < 1e-6 < 0.25 < peer.norm()


def test_hutchinson_unbiased_and_exact_where_it_should_be():
    gen = torch.Generator().manual_seed(0)
    th = torch.randn(4, generator=gen, dtype=DT, requires_grad=True)
    M = torch.randn(4, 4, generator=gen, dtype=DT)
    A = M @ M.T + torch.eye(4, dtype=DT)
    for dist in ('gaussian', 'rademacher'):
        g, = torch.autograd.grad(0.5 * th @ A @ th, th, create_graph=True)
        D = hutchinson_diagonal([th], [g], num_samples=40000, distribution=dist, generator=gen)[0]
        assert ((D - A.diag()).abs() / A.diag()).max() < 0.1, (dist, D, A.diag())   # ~5 standard errors
    Ad = torch.diag(A.diag())
    g, = torch.autograd.grad(0.5 * th @ Ad @ th, th, create_graph=True)
    torch.testing.assert_close(hutchinson_diagonal([th], [g], distribution='rademacher')[0], A.diag(), rtol=1e-12, atol=0)


def test_hutchinson_is_adahessians_estimator():
    "Same call, same Rademacher draws from the global generator: the project's one estimator can serve both chapters"
    start, loss, _ = _problem(SHAPES, 1, seed=6)
    ps = [q.clone().requires_grad_() for q in start]
    def estimate(fn):
        grads = torch.autograd.grad(loss(ps, 1), ps, create_graph=True)
        torch.manual_seed(2)
        return fn(ps, list(grads), 2)
    for a, b in zip(estimate(adahessian.hutchinson_diagonal), estimate(hutchinson_diagonal)): assert torch.equal(a, b)


def test_hutchinson_edge_cases():
    w = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    g, = torch.autograd.grad((w.float() ** 3).sum(), w, create_graph=True)
    D = hutchinson_diagonal([w], [g], distribution='rademacher', num_samples=2)[0]
    assert D.dtype == torch.float32 and torch.equal(D, torch.full((3,), 6.0))
    g, = torch.autograd.grad((w.float() ** 3).sum(), w, create_graph=True)
    plain = torch.zeros(2, requires_grad=True)
    D = hutchinson_diagonal([w, plain], [g, torch.ones(2)])            # a gradient without a graph: estimate 0
    assert torch.equal(D[1], torch.zeros(2))
    with pytest.raises(ValueError, match='num_samples'): hutchinson_diagonal([w], [g], num_samples=0)
    with pytest.raises(ValueError, match='distribution'): hutchinson_diagonal([w], [g], distribution='uniform')


@pytest.mark.parametrize('hypers', [dict(update_period=3, num_samples=2), dict(update_period=1, hessian_distribution='rademacher')], ids=str)
def test_seeded_probes_resume_through_state_dict(hypers):
    "7 steps, torch.save, load into a fresh optimizer (same seed argument, generator moved on), 8 more == 15 straight"
    start, loss, _ = _problem(SHAPES, 15, seed=7)
    make = lambda ps: SophiaH(ps, lr=0.3, p=1.0, betas=(0.9, 0.6), seed=21, **hypers)
    straight, _ = _run(make, start, loss, 15)
    ps, opt = _run(make, start, loss, 7)
    buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    def resume(load):
        qs = [q.detach().clone().requires_grad_() for q in ps]
        fresh = make(qs)
        hutchinson_diagonal(qs, [torch.zeros_like(q) for q in qs], generator=fresh.generator)   # the generator moves on
        if load: fresh.load_state_dict(saved)
        else: fresh.load_state_dict({k: v for k, v in saved.items() if k != 'hutchinson_generator'})
        return _run(make, start, loss, 8, first=8, opt=fresh, params=qs)[0]
    assert torch.equal(_flat(resume(True)), _flat(straight))
    assert not torch.equal(_flat(resume(False)), _flat(straight))        # the generator's state is what resumes


def test_plain_backward_refused_on_due_steps_only():
    w = torch.ones(3, dtype=DT, requires_grad=True)
    opt = SophiaH([w], update_period=2, seed=0)
    (w ** 3).sum().backward()
    with pytest.raises(RuntimeError, match='create_graph'): opt.step()
    assert torch.equal(w.detach(), torch.ones(3, dtype=DT)) and len(opt.state[w]) == 0
    w.grad = None
    (w ** 3).sum().backward(create_graph=True)
    opt.step()                                                         # step 1: an estimate
    w.grad = None
    (w ** 3).sum().backward()
    before = w.detach().clone()
    opt.step()                                                         # step 2: none needed, a plain gradient is fine
    assert not torch.equal(before, w.detach())
    w.grad = None
    (w ** 3).sum().backward()
    with pytest.raises(RuntimeError, match='create_graph'): opt.step() # step 3: due again
    assert all('fresh_hessian' not in s for s in opt.state.values())


def test_refusals():
    with pytest.raises(ValueError, match='compile=True'): SophiaH([torch.zeros(2, requires_grad=True)], compile=True)
    with pytest.raises(ValueError, match=r"SophiaH: seed=1\.5"): SophiaH([torch.zeros(2, requires_grad=True)], seed=1.5)
    with pytest.raises(ValueError, match='hessian_distribution'):
        SophiaH([torch.zeros(2, requires_grad=True)], hessian_distribution='uniform')
    from torch.distributed.tensor import DTensor
    class FakeDTensor(DTensor): pass
    with pytest.raises(TypeError, match='DTensor'): SophiaH([torch.zeros(3).as_subclass(FakeDTensor)])


def test_update_rule_is_the_reparametrised_clip():
    "lr·clamp(m/max(h, eps), -p, p) == η·clip(m/max(γh, ε), 1) with lr = η/γ, p = γ, eps = ε/γ"
    gen = torch.Generator().manual_seed(0)
    m = 0.01 * torch.randn(5000, generator=gen, dtype=DT)
    h = torch.randn(5000, generator=gen, dtype=DT) * torch.logspace(-8, 2, 5000, dtype=DT)
    for gamma in (0.01, 0.3, 5.0):
        eta, epsilon = 1e-3, 1e-9
        paper = eta * (m / torch.clamp(gamma * h, min=epsilon)).clamp(-1, 1)
        ours = eta / gamma * sophia_h_update(m.clone(), torch.zeros_like(m), h.clone(), beta1=0.0, beta2=0.0, p=gamma,
                                             eps=epsilon / gamma)
        assert ((paper - ours).abs() / eta).max() < 1e-14
        assert 0.05 < (paper.abs() == eta).double().mean() < 0.95          # both branches


@pytest.mark.parametrize('hypers', [dict(), dict(update_period=3, num_samples=2, hessian_distribution='rademacher', maximize=True)],
                         ids=str)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=str)
def test_zero_gradients_leave_weights_bit_identical(dtype, hypers):
    """loss = 0·f(w) with create_graph: 12 steps (estimate steps 1 and 11 at update_period=10; 1, 4, 7, 10 at 3) on a
    vector, a matrix, a 4-d kernel and a scalar leave the weights bit-identical: m = 0, ĥ = Hz·z = 0, h = 0, and
    0 / max(0, eps) = 0. The private generator moving on shows the Hessian-vector products were drawn"""
    gen = torch.Generator().manual_seed(8)
    start = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES + [()]]
    ps = [q.clone().requires_grad_() for q in start]
    opt = SophiaH(ps, seed=3, **hypers)
    untouched = torch.Generator().manual_seed(3).get_state()
    f = lambda: sum((q ** 4).sum() + (q.sum() ** 2) for q in ps)
    for _ in range(12):
        opt.zero_grad()
        (0 * f()).backward(create_graph=True)
        assert all(q.grad.requires_grad for q in ps)                   # the due steps really estimate ĥ through a graph
        opt.step()
    for q, q0 in zip(ps, start): assert torch.equal(q.detach(), q0), (dtype, hypers, q, q0)
    for q in ps:
        st = opt.state[q]
        assert st['step'] == 12
        assert torch.equal(st['exp_avg'], torch.zeros_like(q)) and torch.equal(st['hessian_moment'], torch.zeros_like(q))
    assert not torch.equal(opt.generator.get_state(), untouched)
