"""Muon and SOAP (chapters 64, 65): against float64 transcriptions of their equations, against torch.optim.AdamW and
pytorch-optimizer 4.1, the singular values of Muon's update, SOAP's rotation equivariance (and Adam's lack of it), and a
small MLP trained by each."""
from __future__ import annotations
import functools
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch
from torch import nn

from optim_lab.checks import reference_check
from optim_lab.optimizers.adam import Adam
from optim_lab.optimizers.muon import MUON_COEFFS, Muon, orthogonalize
from optim_lab.toolkit.spectral import newton_schulz
from optim_lab.optimizers.soap import SOAP, merge_small_dims
from distributed_harness import is_rank, rank_results, serve_rank, shard_rows

D = torch.float64


# %% float64 transcriptions, written from the equations (Keller Jordan's Muon; SOAP's Algorithm with its refresh)

def muon_reference(theta, grad_fn, steps, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                   adamw_lr=3e-4, adamw_betas=(0.9, 0.95), adamw_eps=1e-10, adamw_wd=0.0):
    a, b, c = 3.4445, -4.7750, 2.0315
    B, m, v = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    out = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        if theta.dim() >= 2:
            B = momentum * B + (1 - momentum) * g
            M = (1 - momentum) * g + momentum * B if nesterov else B
            X = M.reshape(len(M), -1)
            tall = X.shape[0] > X.shape[1]
            if tall: X = X.T
            X = X / (torch.linalg.matrix_norm(X) + 1e-7)
            for _ in range(ns_steps):
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
            if tall: X = X.T
            theta = theta * (1 - lr * weight_decay) - lr * max(1, X.shape[0] / X.shape[1]) ** 0.5 * X.reshape(theta.shape)
        else:
            b1, b2 = adamw_betas
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            theta = theta * (1 - adamw_lr * adamw_wd) - adamw_lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + adamw_eps)
        out.append(theta)
    return out


def soap_reference(theta, grad_fn, steps, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=None, weight_decay=1e-2,
                   precondition_frequency=10, eps=1e-8, correct_bias=True, normalize_gradient=False):
    b1, b2 = betas
    bs = b2 if shampoo_beta is None else shampoo_beta
    M, V = torch.zeros_like(theta), torch.zeros_like(theta)
    matrix = theta.dim() == 2
    def eigvecs(A):
        vals, vecs = torch.linalg.eigh(A)
        return vecs[:, vals.argsort(descending=True)]
    out = []
    for s in range(1, steps + 1):
        G = grad_fn(theta, s)
        if s == 1:
            if matrix:
                L, R = torch.lerp(torch.zeros_like(G @ G.T), G @ G.T, 1 - bs), torch.lerp(torch.zeros_like(G.T @ G), G.T @ G, 1 - bs)
                QL, QR = eigvecs(L), eigvecs(R)
            out.append(theta)
            continue
        t = s - 1
        rot = (lambda X: QL.T @ X @ QR) if matrix else (lambda X: X)
        unrot = (lambda X: QL @ X @ QR.T) if matrix else (lambda X: X)
        M = b1 * M + (1 - b1) * G
        V = b2 * V + (1 - b2) * rot(G) ** 2
        N = unrot(rot(M) / (V.sqrt() + eps))
        if normalize_gradient: N = N / ((N ** 2).mean().sqrt() + 1e-30)   # the authors' constant
        scale = (1 - b2 ** t) ** 0.5 / (1 - b1 ** t) if correct_bias else 1.0
        theta = (theta - lr * scale * N) * (1 - lr * weight_decay)
        if matrix:
            L, R = torch.lerp(L, G @ G.T, 1 - bs), torch.lerp(R, G.T @ G, 1 - bs)   # rounded as the authors' lerp_
            if t % precondition_frequency == 0:
                iL = (QL * (L @ QL)).sum(0).argsort(descending=True)
                iR = (QR * (R @ QR)).sum(0).argsort(descending=True)
                V = V[iL][:, iR]
                QL, QR = torch.linalg.qr((L @ QL)[:, iL])[0], torch.linalg.qr((R @ QR)[:, iR])[0]
        out.append(theta)
    return out


MUON_OTHER = dict(lr=0.05, momentum=0.9, nesterov=False, ns_steps=3, weight_decay=0.1, adamw_lr=1e-2,
                  adamw_betas=(0.8, 0.99), adamw_eps=1e-8, adamw_wd=0.05)


@pytest.mark.parametrize('hypers', [dict(), MUON_OTHER], ids=['defaults', 'other'])
def test_muon_vs_equations(hypers):
    dev = reference_check(Muon, muon_reference, steps=50, shapes=((7,), (4, 6), (6, 3), (3, 2, 2, 2)), noise=3.0, **hypers)
    assert dev < 1e-12, dev


# The matrices are square: after one gradient the larger factor of a non-square matrix is rank-deficient, and the
# eigenvectors of its null space are whatever eigh returns (two correct codes differ there by rounding; chapter 65).
@pytest.mark.parametrize('hypers', [dict(), dict(lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.8, weight_decay=0.1,
                                                   precondition_frequency=3, eps=1e-6, normalize_gradient=True),
                                    dict(correct_bias=False, precondition_frequency=1)], ids=['defaults', 'other', 'no_bias'])
def test_soap_vs_equations(hypers):
    dev = reference_check(SOAP, soap_reference, steps=40, shapes=((7,), (5, 5), (4, 4), (4, 6), (6, 3), (3, 7)), noise=3.0, **hypers)
    assert dev < 1e-10, dev


# %% Muon

def _wide_gradients(steps, shape=(8, 24), seed=0):
    gen = torch.Generator().manual_seed(seed)
    drift = torch.randn(*shape, generator=gen, dtype=D)
    return [drift + torch.randn(*shape, generator=gen, dtype=D) for _ in range(steps)]


def test_muon_update_singular_values_every_step():
    "The update of a full-rank wide matrix (its step / lr) has every singular value in [0.6, 1.3], at every step"
    w = torch.randn(8, 24, dtype=D, requires_grad=True)
    opt = Muon([w], lr=0.1)
    lows, highs = [], []
    for g in _wide_gradients(30):
        before = w.detach().clone()
        w.grad = g
        opt.step()
        s = torch.linalg.svdvals((before - w.detach()) / 0.1)
        lows.append(s.min().item()); highs.append(s.max().item())
    assert min(lows) >= 0.6 and max(highs) <= 1.3, (min(lows), max(highs))
    assert min(lows) < 0.95 and max(highs) > 1.05   # the quintic does not converge: the band is really used


def test_muon_first_update_is_the_polar_factor():
    "First step: the update has G's singular vectors, and is UVᵀ to the five quintic steps' tolerance"
    g = _wide_gradients(1)[0]
    w = torch.zeros(8, 24, dtype=D, requires_grad=True)
    w.grad = g.clone()
    Muon([w], lr=1.0).step()
    update = -w.detach()
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    polar = U @ Vh
    assert torch.linalg.matrix_norm(update - polar, ord=2) < 0.33         # σ ∈ [0.68, 1.14] after five steps
    rotated = U.T @ update @ Vh.T                                          # diagonal iff the singular vectors agree
    assert (rotated - torch.diag(torch.diagonal(rotated))).abs().max() < 1e-10
    cos = (update * polar).sum() / (update.norm() * polar.norm())
    assert cos > 0.98, cos


def test_orthogonalize_keeps_muons_epsilon():
    "X₀ = M/(‖M‖ + 1e-7): a tiny momentum's update shrinks as in the reference (the toolkit alone would not shrink it)"
    m = _wide_gradients(1)[0] * 1e-7 / 3
    x = m / (m.norm() + 1e-7)
    for _ in range(5):
        A = x @ x.T
        x = 3.4445 * x + (-4.7750 * A + 2.0315 * A @ A) @ x
    torch.testing.assert_close(orthogonalize(m), x, rtol=1e-10, atol=1e-12)
    without_eps = newton_schulz(m, [MUON_COEFFS] * 5)                    # the toolkit's own normalisation
    assert (without_eps - x).abs().max() > 1e-2


@pytest.mark.parametrize('flagged', [False, True], ids=['by_shape', 'use_muon_false_group'])
def test_muon_adamw_part_follows_torch_adamw(flagged):
    "1-D tensors (and, in a use_muon=False group, a matrix too) follow torch.optim.AdamW to 1e-5 over 60 steps"
    gen = torch.Generator().manual_seed(0)
    shapes = [(10,), (4, 3)] if flagged else [(10,), ()]
    init = [torch.randn(torch.Size(s).numel(), generator=gen).reshape(s) for s in shapes]
    ours = [x.clone().requires_grad_() for x in init]
    ref = [x.clone().requires_grad_() for x in init]
    other = torch.randn(5, 5, requires_grad=True)      # a Muon matrix in the same optimizer
    groups = [dict(params=ours, use_muon=False), dict(params=[other], use_muon=True)] if flagged else ours + [other]
    opt = Muon(groups, adamw_lr=1e-2, adamw_betas=(0.85, 0.98), adamw_eps=1e-8, adamw_wd=0.1)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.85, 0.98), eps=1e-8, weight_decay=0.1)
    for _ in range(60):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.numel(), generator=gen).reshape(a.shape); b.grad = a.grad.clone()
        other.grad = torch.randn(5, 5, generator=gen)
        opt.step(); torch_opt.step()
    dev = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    assert dev < 1e-5, dev
    assert 'momentum_buffer' in opt.state[other] and 'momentum_buffer' not in opt.state[ours[-1]]


def test_muon_use_muon_true_on_a_vector():
    "A 1-D tensor in a use_muon=True group is an n×1 matrix: its first step is lr × (the quintic of 1) × g/‖g‖"
    g = torch.randn(6, dtype=D)
    w = torch.zeros(6, dtype=D, requires_grad=True)
    w.grad = g.clone()
    Muon([dict(params=[w], use_muon=True)], lr=1.0).step()
    m_norm = (1 - 0.95 ** 2) * g.norm().item()                          # ‖M₁‖: Nesterov's (1-μ)g + μ(1-μ)g
    x = torch.tensor(1 / (1 + 1e-7 / m_norm), dtype=D)
    for _ in range(5): x = 3.4445 * x - 4.7750 * x ** 3 + 2.0315 * x ** 5
    scale = 6 ** 0.5                                                      # √max(1, rows/cols) for a 6×1 column
    torch.testing.assert_close(-w.detach(), scale * x * g / g.norm(), rtol=1e-10, atol=1e-12)


def test_muon_vs_pytorch_optimizer(monkeypatch):
    "pytorch-optimizer's Muon with use_muon groups (its Newton–Schulz switched from bfloat16 to float64): same iterates"
    muon_base = pytest.importorskip('pytorch_optimizer.optimizer.muon.base')
    import pytorch_optimizer
    monkeypatch.setattr(muon_base, 'zero_power_via_newton_schulz_5',
                        functools.partial(muon_base.zero_power_via_newton_schulz_5, dtype=D))
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (4, 9), (3, 2, 3, 3), (5,)]
    init = [torch.randn(*s, generator=gen, dtype=D) for s in shapes]
    ours, theirs = [[x.clone().requires_grad_() for x in init] for _ in range(2)]
    hypers = dict(lr=0.03, momentum=0.9, weight_decay=0.05, adamw_lr=1e-2, adamw_wd=0.1)
    opt = Muon(ours, **hypers)
    peer = pytorch_optimizer.Muon([dict(params=theirs[:3], use_muon=True), dict(params=theirs[3:], use_muon=False)],
                                  foreach=False, **hypers)
    for _ in range(40):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=D); b.grad = a.grad.clone()
        opt.step(); peer.step()
    dev = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    assert dev < 1e-6, dev    # the peer normalises by max(‖M‖, 1e-7), the reference (and ours) by ‖M‖ + 1e-7


# %% SOAP

def _soap_peer_run(shapes, dtype, steps, **hypers):
    import pytorch_optimizer
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
    ours, theirs = [[x.clone().requires_grad_() for x in init] for _ in range(2)]
    opt, peer = SOAP(ours, **hypers), pytorch_optimizer.SOAP(theirs, **hypers)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            a.grad = (a.detach() + torch.randn(a.shape, generator=gen, dtype=dtype)); b.grad = a.grad.clone()
        opt.step(); peer.step()
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


# Shapes whose every unfolding is full rank after one gradient (see test_soap_vs_equations); a 1-D tensor too.
SOAP_SHAPES = [(5, 5), (3, 2, 2, 2), (4, 3, 3), (7,)]


@pytest.mark.parametrize('hypers', [dict(), dict(lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.9, weight_decay=0.1,
                                                   precondition_frequency=3, normalize_gradient=True, eps=1e-6),
                                    dict(precondition_1d=True, correct_bias=False, precondition_frequency=5),
                                    dict(max_precondition_dim=3, precondition_frequency=4)],
                         ids=['defaults', 'other', 'precondition_1d', 'max_dim'])
def test_soap_vs_pytorch_optimizer_float32(hypers):
    "Identical settings, 30 steps, float32 (the peer casts its QR to float32, so float32 is where both are exact)"
    pytest.importorskip('pytorch_optimizer')
    dev = _soap_peer_run(SOAP_SHAPES, torch.float32, 30, **hypers)
    assert dev < 2e-5, dev


def test_soap_vs_pytorch_optimizer_merge_dims():
    "merge_dims on tensors that do not merge into one dimension (the peer crashes on those; chapter 65)"
    pytest.importorskip('pytorch_optimizer')
    dev = _soap_peer_run([(6, 5, 2), (2, 3, 4, 4)], torch.float32, 25, merge_dims=True, max_precondition_dim=12,
                         precondition_frequency=3)
    assert dev < 2e-5, dev
    for fmt in ('channels_first', 'channels_last'):    # and the channels-last layout, against ours with it permuted
        torch.manual_seed(0)
        w = torch.randn(2, 3, 4, 4)
        a = w.clone().requires_grad_(); b = w.permute(0, 2, 3, 1).contiguous().requires_grad_()
        oa = SOAP([a], merge_dims=True, max_precondition_dim=12, precondition_frequency=2)
        ob = SOAP([b], merge_dims=True, max_precondition_dim=12, precondition_frequency=2, data_format='channels_last')
        for _ in range(8):
            g = torch.randn(2, 3, 4, 4)
            a.grad, b.grad = g.clone(), g.permute(0, 2, 3, 1).contiguous()
            oa.step(); ob.step()
        torch.testing.assert_close(a.detach().permute(0, 2, 3, 1), b.detach(), rtol=1e-5, atol=1e-6)


def test_soap_merge_small_dims():
    assert merge_small_dims([1, 2, 512, 1, 2048, 1, 3, 4], 1024) == [1024, 2048, 12]
    assert merge_small_dims([1, 2, 768, 1, 2048], 1024) == [2, 768, 2048]
    assert merge_small_dims([4, 5], 10000) == [20]                 # the peer returns [1] here and then crashes


def _rotated_run(opt_factory, rotate, steps=40, n=6, seed=0):
    "Iterates on f(W) = ½‖A(W - W*)B‖² + noise, aligned (A, B diagonal) or rotated by orthogonal U, V; U, V too"
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.logspace(0, 1, n, dtype=D), torch.logspace(0.5, 0, n, dtype=D)
    target = torch.randn(n, n, generator=gen, dtype=D)
    Ur, Vr = (torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))[0] for _ in range(2))
    U, V = (Ur, Vr) if rotate else (torch.eye(n, dtype=D),) * 2
    A, B, T = U @ torch.diag(a) @ U.T, V @ torch.diag(b) @ V.T, U @ target @ V.T
    noise = torch.Generator().manual_seed(seed + 1)
    W = torch.zeros(n, n, dtype=D, requires_grad=True)
    opt = opt_factory([W])
    out = []
    for _ in range(steps):
        Z = torch.randn(n, n, generator=noise, dtype=D)
        W.grad = A @ A @ (W.detach() - T + 0.3 * U @ Z @ V.T) @ B @ B
        opt.step()
        out.append(W.detach().clone())
    return out, U, V


def test_soap_rotation_equivariant_adam_not():
    "Gradients UGVᵀ of the rotated problem UWVᵀ: SOAP's iterates are U W_t Vᵀ to 1e-4; Adam's are not"
    def deviation(factory):
        aligned, _, _ = _rotated_run(factory, False)
        rotated, U, V = _rotated_run(factory, True)
        return max((U @ w @ V.T - r).abs().max().item() for w, r in zip(aligned, rotated))
    soap_dev = deviation(lambda ps: SOAP(ps, lr=0.03, precondition_frequency=5))
    adam_dev = deviation(lambda ps: Adam(ps, lr=0.03))
    assert soap_dev < 1e-4, soap_dev
    assert adam_dev > 1e-2, adam_dev


def test_soap_first_step_only_gathers_statistics():
    w = torch.randn(4, 4, requires_grad=True)
    before = w.detach().clone()
    w.grad = torch.randn(4, 4)
    opt = SOAP([w])
    opt.step()
    assert torch.equal(w.detach(), before)
    q = opt.state[w]['Q_0']
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)


# %% Training a small MLP

def _mlp_losses(make_opt, steps=150):
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = torch.sin(x @ torch.randn(8, 1)) + 0.5 * x[:, :1]
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('factory', [lambda ps: Muon(ps, lr=0.02, adamw_lr=3e-3), lambda ps: SOAP(ps, lr=1e-2)],
                         ids=['Muon', 'SOAP'])
def test_trains_a_small_mlp(factory):
    losses = _mlp_losses(factory)
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


# %% FSDP2: the sharded step is the one-process step (identical gradients on both sides, so no rounding chaos)
#
# tests/test_distributed.py compares a 2-rank run with one process on real training, within the rule's own noise
# floor (one process fed the mean of two half-batch gradients). SOAP's floor there is the size of its step: its
# first-step factors are rank-deficient and nearly so, and rounding rotates their (near-)null eigenvectors, which
# Adam's 1/√V amplifies. Here both sides get bit-identical full gradients, so the only difference is the sharding.

DIST_SHAPES = [(5, 2, 3, 3), (3, 16), (1, 3), (6, 6), (7,)]   # uneven shards; rank 1 holds no row of (1, 3)
DIST_STEPS = 12
DIST_OPTS = {'Muon': lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, adamw_lr=1e-2),
             'SOAP': lambda ps: SOAP(ps, lr=1e-2, precondition_frequency=4, precondition_1d=True)}


def _dist_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(torch.Size(s).numel(), generator=gen).reshape(s) for s in DIST_SHAPES]


def _dist_run(name, shard=lambda t: t):
    params = [nn.Parameter(shard(t)) for t in _dist_tensors(0)]
    opt = DIST_OPTS[name](params)
    for t in range(DIST_STEPS):
        for p, g in zip(params, _dist_tensors(t + 1)): p.grad = shard(g)
        opt.step()
    return params, opt


def _dist_worker(mesh, out_dir):
    from torch.distributed.tensor import DTensor
    results = {}
    for name in DIST_OPTS:
        params, opt = _dist_run(name, shard_rows(mesh))
        moments = ('momentum_buffer', 'exp_avg', 'exp_avg_sq')   # (SOAP's factors of a square matrix are replicated)
        sharded_state = all(isinstance(v, DTensor) and v.placements == p.placements
                            for p in params for k, v in opt.state[p].items() if k in moments)
        results[name] = dict(weights=[p.full_tensor() for p in params], sharded_state=sharded_state)
    return results


def test_fsdp2_sharded_step_equals_one_process(tmp_path):
    ranks = rank_results(__file__, tmp_path)
    for name in DIST_OPTS:
        one, _ = _dist_run(name)
        init = _dist_tensors(0)
        assert max((p.detach() - q).abs().max().item() for p, q in zip(one, init)) > 1e-2   # it moved
        for r in ranks:
            assert r[name]['sharded_state'], f'{name}: a parameter-shaped state tensor is not sharded like its parameter'
            dev = max((a - b.detach()).abs().max().item() for a, b in zip(r[name]['weights'], one))
            assert dev < 1e-6, f'{name}: 2 ranks vs one process {dev:.2e}'


if is_rank(__name__): serve_rank(_dist_worker)
