"""Differential tests: AdamP, SGDP, Nero, Shampoo, AdaHessian against pytorch-optimizer 4.1, configured identically
(float32, >= 50 steps, 1e-5); where the peer deviates from the paper (see the chapters 25-28), against a float64
transcription of the equations instead.

Peer-only switches set everywhere: `foreach=False` (its per-parameter loop; for AdamP/SGDP also `foreach=True`),
`fixed_decay=False` (decay scaled by lr, as ours), `weight_decouple` = our `decoupled_wd`.
"""
from __future__ import annotations
import math

import pytest
import torch
from peer_versions import peer_is

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

from optim_lab.checks import max_deviation, noisy_quadratic, run_optimizer
from optim_lab.optimizers.adamp import AdamP, SGDP
from optim_lab.optimizers.nero import Nero
from optim_lab.optimizers.shampoo import Shampoo
from optim_lab.optimizers.adahessian import AdaHessian

STEPS = 60
TOL = 1e-5


def invariant_problem(shape, steps, seed=0, view='channel', dtype=torch.float32):
    "Gradients orthogonal to θ per row ('channel'), to the whole θ ('tensor'), or not ('none'): AdamP's projection fires or not"
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    A = torch.randn(shape[-1], shape[-1], generator=gen, dtype=torch.float64) / shape[-1] ** 0.5
    xi = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    def grad_fn(theta, t):
        theta = theta.to(torch.float64)
        g = theta @ A + xi[t - 1]
        if view == 'channel' and theta.dim() > 1:
            rows, grow = theta.reshape(shape[0], -1), g.reshape(shape[0], -1)
            unit = rows / rows.norm(dim=1, keepdim=True)
            g = (grow - unit * (unit * grow).sum(1, keepdim=True)).view(shape)
        elif view == 'tensor':
            unit = theta / theta.norm()
            g = g - unit * (unit * g).sum()
        return g
    return theta0.to(dtype), grad_fn


def deviation(ours, theirs, problems):
    return max(max_deviation(run_optimizer(ours, theta0, grad_fn, STEPS), run_optimizer(theirs, theta0, grad_fn, STEPS))
               for theta0, grad_fn in problems)


def projection_problems(dtype=torch.float32):
    return [invariant_problem(shape, STEPS, seed=i, view=view, dtype=dtype)
            for view in ('channel', 'tensor', 'none') for i, shape in enumerate([(7,), (4, 5), (3, 2, 2, 2)])]


# %% AdamP / SGDP

ADAMP = [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, nesterov=True, delta=0.2, wd_ratio=0.3),
         dict(lr=3e-2, weight_decay=0.5, maximize=True)]

@pytest.mark.parametrize('hypers', ADAMP, ids=str)
@pytest.mark.parametrize('foreach', [False, True])
def test_adamp_matches_peer(hypers, foreach):
    # the peer adds eps before the bias correction; at eps = 1e-8 and gradients of order 1 that is far below 1e-5
    ours = lambda ps: AdamP(ps, decoupled_wd=True, **hypers)
    peer = lambda ps: pytorch_optimizer.AdamP(ps, weight_decouple=True, fixed_decay=False, foreach=foreach, **hypers)
    assert deviation(ours, peer, projection_problems()) < TOL


SGDP_SETTINGS = [dict(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
                 dict(lr=1e-2, momentum=0.5, dampening=0.1, weight_decay=0.3, wd_ratio=0.5, delta=0.2),
                 dict(lr=3e-2, maximize=True)]

@pytest.mark.parametrize('hypers', SGDP_SETTINGS, ids=str)
@pytest.mark.parametrize('foreach', [False, True])
def test_sgdp_matches_peer(hypers, foreach):
    ours = lambda ps: SGDP(ps, decoupled_wd=True, **hypers)
    peer = lambda ps: pytorch_optimizer.SGDP(ps, weight_decouple=True, fixed_decay=False, foreach=foreach, **hypers)
    assert deviation(ours, peer, projection_problems()) < TOL


def _projection(theta, g, u, delta, eps):
    if theta.dim() < 2: return u, False
    def cos(a, b): return abs(float((a * b).sum())) / (max(float(a.norm()), eps) * max(float(b.norm()), eps))
    if max(cos(g[c], theta[c]) for c in range(theta.shape[0])) < delta / math.sqrt(theta[0].numel()):
        q = u.clone()
        for c in range(theta.shape[0]):
            unit = theta[c] / (theta[c].norm() + eps)
            q[c] = u[c] - unit * (unit * u[c]).sum()
        return q, True
    if cos(g, theta) < delta / math.sqrt(theta.numel()):
        unit = theta / (theta.norm() + eps)
        return u - unit * (unit * u).sum(), True
    return u, False


def _run_reference(theta, grad_fn, direction, lr, weight_decay, decoupled_wd, delta=0.1, wd_ratio=0.1, eps=1e-8, wd_scale=1.0):
    iterates = []
    for t in range(1, STEPS + 1):
        g = grad_fn(theta, t)
        if not decoupled_wd: g = g + weight_decay * theta
        q, fired = _projection(theta, g, direction(g, t), delta, eps)
        if decoupled_wd: theta = theta * (1 - lr * weight_decay * (wd_ratio if fired else 1.0) * wd_scale)
        theta = theta - lr * q
        iterates.append(theta)
    return iterates


@pytest.mark.parametrize('cls', ['AdamP', 'SGDP'])
def test_l2_against_float64_transcription(cls):
    "The peer drops L2 (decoupled_wd=False): compared with the equations instead, in float64"
    lr, wd, beta1, beta2, mu = 1e-2, 0.3, 0.9, 0.999, 0.9
    for theta0, grad_fn in projection_problems(torch.float64):
        state = dict(m=torch.zeros_like(theta0), v=torch.zeros_like(theta0))
        def adam_dir(g, t):
            state['m'] = beta1 * state['m'] + (1 - beta1) * g
            state['v'] = beta2 * state['v'] + (1 - beta2) * g * g
            return (state['m'] / (1 - beta1 ** t)) / (torch.sqrt(state['v'] / (1 - beta2 ** t)) + 1e-8)
        def sgd_dir(g, t):
            state['m'] = mu * state['m'] + g
            return state['m']
        ref = _run_reference(theta0.clone(), grad_fn, adam_dir if cls == 'AdamP' else sgd_dir, lr, wd, False)
        make = (lambda ps: AdamP(ps, lr=lr, weight_decay=wd, decoupled_wd=False)) if cls == 'AdamP' else \
               (lambda ps: SGDP(ps, lr=lr, momentum=mu, weight_decay=wd, decoupled_wd=False))
        assert max_deviation(run_optimizer(make, theta0, grad_fn, STEPS), ref) < 1e-12


def test_peer_drops_l2():
    "What the float64 test replaces: the peer's trajectory with L2 equals the one without decay"
    theta0, grad_fn = invariant_problem((4, 5), STEPS, view='none')
    runs = [run_optimizer(lambda ps: pytorch_optimizer.AdamP(ps, lr=1e-2, weight_decay=wd, weight_decouple=False),
                          theta0, grad_fn, STEPS) for wd in (0.0, 0.5)]
    if peer_is('pytorch_optimizer'): assert max_deviation(*runs) == 0.0
    ours = [run_optimizer(lambda ps: AdamP(ps, lr=1e-2, weight_decay=wd, decoupled_wd=False), theta0, grad_fn, STEPS)
            for wd in (0.0, 0.5)]
    assert max_deviation(*ours) > 1e-3


# %% Nero

NERO = [dict(lr=1e-2), dict(lr=3e-2, beta=0.9, eps=1e-6), dict(lr=1e-2, constraints=False, maximize=True)]

@pytest.mark.parametrize('hypers', NERO, ids=str)
@pytest.mark.parametrize('foreach', [False, True])
def test_nero_matches_peer(hypers, foreach):
    # shapes without single-weight neurons: the peer zeroes those (chapter 27)
    problems = [noisy_quadratic(shape, STEPS, seed=i, dtype=torch.float32)
                for i, shape in enumerate([(7,), (4, 5), (3, 2, 2, 2), ()])]
    ours = lambda ps: Nero(ps, **hypers)
    peer = lambda ps: pytorch_optimizer.Nero(ps, foreach=foreach, **hypers)
    assert deviation(ours, peer, problems) < TOL


# %% Shampoo

SHAMPOO = [dict(lr=1e-2), dict(lr=1e-2, momentum=0.9), dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True),
           dict(lr=1e-2, weight_decay=0.1, maximize=True)]

@pytest.mark.parametrize('hypers', SHAMPOO, ids=str)
def test_shampoo_matches_peer(hypers):
    # preconditioning_compute_steps=1 (the peer skips the first K-1 steps otherwise); no momentum together with L2
    # (the peer adds L2 after the momentum mix, we before). Shapes whose unfoldings have full rank from step 1, and a
    # matrix_eps of 1e-3: with a rank-deficient statistic the result depends on rounding at the eps^(-1/2k) scale,
    # where the peer's float32 SVD and our float64 eigh legitimately differ.
    peer_h = {('weight_decouple' if k == 'decoupled_wd' else k): v for k, v in hypers.items()}
    problems = [noisy_quadratic(shape, STEPS, seed=i, dtype=torch.float32) for i, shape in enumerate([(4, 5), (3, 2, 2), (5, 3)])]
    # the paper's settings: no grafting, no warm-up, no blocks, roots every step (the peer's defaults; ours are practical)
    ours = lambda ps: Shampoo(ps, matrix_eps=1e-3, graft_type='none', preconditioning_compute_steps=1,
                              start_preconditioning_step=1, block_size=None, **hypers)
    peer = lambda ps: pytorch_optimizer.Shampoo(ps, matrix_eps=1e-3, fixed_decay=False, preconditioning_compute_steps=1, **peer_h)
    assert deviation(ours, peer, problems) < TOL


def _shampoo_reference(theta, grad_fn, lr, momentum, K, eps, max_dim):
    k, shape = theta.dim(), theta.shape
    full = [n <= max_dim for n in shape]
    H = [eps * torch.eye(n, dtype=theta.dtype) if f else eps * torch.ones(n, dtype=theta.dtype) for n, f in zip(shape, full)]
    P, U_prev, iterates = [None] * k, None, []
    for t in range(1, STEPS + 1):
        g = grad_fn(theta, t)
        if t > 1: g = (1 - momentum) * g + momentum * U_prev
        for i in range(k):
            G_i = g.movedim(i, 0).reshape(shape[i], -1)
            H[i] = H[i] + (G_i @ G_i.T if full[i] else (G_i * G_i).sum(1))
            if (t - 1) % K == 0:
                if full[i]:
                    u, s, vh = torch.linalg.svd(H[i])
                    P[i] = u @ torch.diag(s.clamp_min(eps) ** (-1 / (2 * k))) @ vh
                else: P[i] = H[i].clamp_min(eps) ** (-1 / (2 * k))
        U = g
        for i in range(k):
            U = torch.tensordot(P[i], U, dims=([1], [i])).movedim(0, i) if full[i] else \
                U * P[i].reshape([-1 if j == i else 1 for j in range(k)])
        theta, U_prev = theta - lr * U, U
        iterates.append(theta)
    return iterates


@pytest.mark.parametrize('hypers', [dict(K=1, momentum=0.0, max_dim=1024), dict(K=1, momentum=0.5, max_dim=4)], ids=str)
def test_shampoo_momentum_and_diagonal_against_float64(hypers):
    "The paper's rule with the peer's momentum, and diagonal dims: float64 (K > 1 needs a graft: tests/test_shampoo_practical.py)"
    for i, shape in enumerate([(7,), (4, 5), (3, 2, 5)]):
        theta0, grad_fn = noisy_quadratic(shape, STEPS, seed=i)
        ours = run_optimizer(lambda ps: Shampoo(ps, lr=1e-2, momentum=hypers['momentum'], matrix_eps=0.1, graft_type='none',
                                                preconditioning_compute_steps=hypers['K'], max_precond_dim=hypers['max_dim'],
                                                start_preconditioning_step=1, block_size=None),
                             theta0, grad_fn, STEPS)
        ref = _shampoo_reference(theta0.clone(), grad_fn, 1e-2, hypers['momentum'], hypers['K'], 0.1, hypers['max_dim'])
        assert max_deviation(ours, ref) < 1e-10


def test_shampoo_huge_dims_never_build_big_matrices():
    for shape in [(2 ** 17,), (2 ** 17, 2)]:
        w = torch.zeros(shape, requires_grad=True)
        opt = Shampoo([w], lr=0.1)
        for _ in range(3):
            w.grad = torch.randn(shape)
            opt.step()
        assert all(v.numel() <= w.numel() for v in opt.state[w].values() if isinstance(v, torch.Tensor))
        assert torch.isfinite(w).all() and w.abs().sum() > 0


# %% AdaHessian

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(8, 6, generator=g) / 3)
        self.b1 = torch.nn.Parameter(torch.zeros(8))
        self.w2 = torch.nn.Parameter(torch.randn(1, 8, generator=g) / 3)
    def forward(self, x): return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T


def _adahessian_run(make, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)
    net = _Net()
    opt = make(list(net.parameters()))
    torch.manual_seed(seed)            # both sides draw the same Rademacher vectors from the global generator
    iterates = []
    for t in range(steps):
        opt.zero_grad()
        i = (t % 4) * 8
        ((net(x[i:i + 8]) - y[i:i + 8]) ** 2).mean().backward(create_graph=True)
        opt.step()
        iterates.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    return iterates


ADAHESSIAN = [dict(lr=0.1), dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.01, hessian_power=0.5, eps=1e-4),
              dict(lr=0.05, weight_decay=0.1, decoupled_wd=False, num_samples=2, eps=1e-4)]

@pytest.mark.parametrize('hypers', ADAHESSIAN, ids=str)
@pytest.mark.parametrize('foreach', [False, True])
def test_adahessian_matches_peer(hypers, foreach):
    # update_period=1 and no 4-d kernels: there the peer deviates (tests below and chapter 26)
    peer_h = {('weight_decouple' if k == 'decoupled_wd' else k): v for k, v in hypers.items()}
    peer_h.setdefault('weight_decouple', True)
    ours = _adahessian_run(lambda ps: AdaHessian(ps, **hypers))
    peer = _adahessian_run(lambda ps: pytorch_optimizer.AdaHessian(ps, fixed_decay=False, foreach=foreach, **peer_h))
    assert max_deviation(ours, peer) < TOL


def _adahessian_reference(theta, loss_fn, lr, beta1, beta2, eps, update_period):
    shape, n = theta.shape, theta.numel()
    m, v, D, iterates = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta), []
    for t in range(1, STEPS + 1):
        x = theta.clone().requires_grad_()
        g = torch.autograd.grad(loss_fn(x, t), x)[0]
        if (t - 1) % update_period == 0:
            H = torch.autograd.functional.hessian(lambda y: loss_fn(y, t), theta).reshape(n, n)
            z = torch.randint_like(theta, 0, 2) * 2 - 1
            D = z * (H @ z.reshape(-1)).reshape(shape)
        D_bar = D.abs().mean(dim=(2, 3), keepdim=True).expand(shape) if theta.dim() == 4 else D
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * D_bar ** 2
        theta = theta - lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
        iterates.append(theta)
    return iterates


@pytest.mark.parametrize('update_period', [1, 3])
def test_adahessian_kernels_and_period_against_float64(update_period):
    "4-d kernels (spatial |D| averaging) and update_period > 1 (v updated every step): the float64 transcription"
    for i, shape in enumerate([(2, 2, 3, 3), (3, 4)]):
        gen = torch.Generator().manual_seed(i)
        n = math.prod(shape)
        M = torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5
        A = M @ M.T + 0.1 * torch.eye(n, dtype=torch.float64)
        xi = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(STEPS)]
        theta0 = torch.randn(shape, generator=gen, dtype=torch.float64)
        def loss_fn(theta, t):
            x = theta.reshape(-1)
            return 0.5 * x @ A @ x + 0.25 * (x ** 4).sum() + (xi[t - 1] * theta).sum()
        p = theta0.clone().requires_grad_()
        opt, ours = AdaHessian([p], lr=0.05, update_period=update_period), []
        torch.manual_seed(7)
        for t in range(1, STEPS + 1):
            opt.zero_grad()
            loss_fn(p, t).backward(create_graph=True)
            opt.step()
            ours.append(p.detach().clone())
        torch.manual_seed(7)
        ref = _adahessian_reference(theta0.clone(), loss_fn, 0.05, 0.9, 0.999, 1e-16, update_period)
        assert max_deviation(ours, ref) < 1e-12


def test_adahessian_plain_backward_refused():
    w = torch.ones(3, requires_grad=True)
    opt = AdaHessian([w])
    (w ** 3).sum().backward()
    with pytest.raises(RuntimeError, match='create_graph'): opt.step()
    assert torch.equal(w.detach(), torch.ones(3)) and len(opt.state[w]) == 0
    assert AdaHessian.needs_create_graph is True
