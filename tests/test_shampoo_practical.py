"""Shampoo as practitioners run it (chapter 28): grafting, the warm-up, amortised roots and blocks.

The float64 transcription here is written from the equations in matrix form (L^(-1/4) G R^(-1/4) for a matrix,
H^(-1/2) g for a vector, roots from an SVD), independently of the class's mode-i contractions.
"""
from __future__ import annotations
import math

import pytest
import torch

from optim_lab.optimizers.shampoo import Shampoo, shampoo_blocks, shampoo_update
from distributed_harness import is_rank, rank_results, serve_rank, shard_rows

EXACT = dict(preconditioning_compute_steps=1, start_preconditioning_step=1, graft_type='none', block_size=None)


def _root(h, power, eps):
    u, s, vh = torch.linalg.svd(h)
    return u @ torch.diag(s.clamp_min(eps) ** (-power)) @ vh


def _transcription(theta, grads, lr, graft_type, start, K, eps, diagonal_eps=1e-10, row_block=None):
    "Grafted Shampoo with momentum 0 on a vector or a matrix (rows cut into blocks of `row_block`), float64"
    blocks = [slice(0, len(theta))] if row_block is None else [slice(a, min(a + row_block, len(theta)))
                                                              for a in range(0, len(theta), row_block)]
    stats = {b.start: None for b in blocks}
    roots = {}
    sum_sq, out = torch.zeros_like(theta), []
    for t, g in enumerate(grads, 1):
        sum_sq = sum_sq + g * g
        graft = g / (sum_sq.sqrt() + diagonal_eps) if graft_type == 'adagrad' else g
        direction = torch.zeros_like(g)
        for b in blocks:
            G = g[b]
            if theta.dim() == 1:
                H = stats[b.start] if stats[b.start] is not None else eps * torch.eye(len(G), dtype=G.dtype)
                stats[b.start] = H + torch.outer(G, G)
                if t >= start and (t - start) % K == 0: roots[b.start] = (_root(stats[b.start], 0.5, eps),)
                if t >= start: direction[b] = roots[b.start][0] @ G
            else:
                if stats[b.start] is None:
                    stats[b.start] = (eps * torch.eye(G.shape[0], dtype=G.dtype), eps * torch.eye(G.shape[1], dtype=G.dtype))
                L, R = stats[b.start]
                stats[b.start] = (L + G @ G.T, R + G.T @ G)
                if t >= start and (t - start) % K == 0:
                    roots[b.start] = tuple(_root(m, 0.25, eps) for m in stats[b.start])
                if t >= start: direction[b] = roots[b.start][0] @ G @ roots[b.start][1]
        if t < start: step = graft
        elif graft_type == 'none': step = direction
        else: step = direction * graft.norm() / direction.norm()
        theta = theta - lr * step
        out.append(theta)
    return out


def _run_ours(theta0, grads, **hypers):
    w = theta0.clone().requires_grad_()
    opt = Shampoo([w], momentum=0.0, **hypers)
    out = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        out.append(w.detach().clone())
    return out


def _gradients(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize('graft_type,start,K', [('adagrad', 1, 1), ('sgd', 1, 1), ('none', 1, 1),
                                                 ('adagrad', 5, 3), ('sgd', 5, 3), ('none', 5, 1)])
@pytest.mark.parametrize('shape', [(6,), (4, 6), (6, 3)], ids=str)
def test_grafted_shampoo_against_float64_transcription(graft_type, start, K, shape):
    # a tiny matrix_eps: the roots are those of the statistics themselves. With K = 1 and full-rank statistics after a
    # few steps, roundings outside the visited span are not reused; with K = 3 from step 5 the statistics of these
    # shapes have full rank (5+ gradients) when the first root is taken. 1e-9: the SVD and eigh roots of eps-sized
    # eigenvalues agree to ~1e-11 relative, amplified by at most the graft's normalisation.
    eps = 1e-10
    grads = _gradients(shape, 40, seed=len(shape) + start)
    theta0 = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = _run_ours(theta0, grads, lr=1e-2, graft_type=graft_type, start_preconditioning_step=start,
                     preconditioning_compute_steps=K, matrix_eps=eps, block_size=None)
    ref = _transcription(theta0, grads, 1e-2, graft_type, start, K, eps)
    assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) < 1e-9


def test_reused_roots_without_a_graft_are_refused():
    "The paper's rule reuses no root: with K > 1 a root from a rank-deficient statistic scales unseen directions by eps^(-1/2k)"
    w = torch.ones(7, requires_grad=True)
    with pytest.raises(ValueError, match="preconditioning_compute_steps=10 with graft_type='none'"):
        Shampoo([w], graft_type='none', preconditioning_compute_steps=10)
    with pytest.raises(ValueError, match="graft_type='none'"):      # the default K is 20
        Shampoo([w], graft_type='none')
    opt = Shampoo([w], graft_type='none', preconditioning_compute_steps=1)
    with pytest.raises(ValueError, match="graft_type='none'"):
        opt.param_groups[0]['preconditioning_compute_steps'] = 2
    with pytest.raises(ValueError, match="graft_type='none'"):
        opt.add_param_group(dict(params=[torch.ones(2, requires_grad=True)], preconditioning_compute_steps=5))
    assert opt.param_groups[0]['preconditioning_compute_steps'] == 1 and len(opt.param_groups) == 1


@pytest.mark.parametrize('shape', [(7,), (7, 3)], ids=str)
def test_blocks_against_float64_transcription(shape):
    grads = _gradients(shape, 40, seed=3)
    theta0 = torch.zeros(shape, dtype=torch.float64)
    hypers = dict(lr=1e-2, graft_type='adagrad', start_preconditioning_step=4, preconditioning_compute_steps=5, matrix_eps=1e-3)
    ours = _run_ours(theta0, grads, block_size=3, **hypers)
    ref = _transcription(theta0, grads, 1e-2, 'adagrad', 4, 5, 1e-3, row_block=3)
    unblocked = _transcription(theta0, grads, 1e-2, 'adagrad', 4, 5, 1e-3)
    assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) < 1e-10
    # the check can fail: blocks are a different preconditioner
    assert max((a - b).abs().max().item() for a, b in zip(ours, unblocked)) > 1e-4


def test_practical_defaults_and_the_papers_setting():
    w = torch.zeros(3, requires_grad=True)
    group = Shampoo([w]).param_groups[0]
    assert (group['preconditioning_compute_steps'], group['start_preconditioning_step'], group['graft_type'],
            group['block_size'], group['max_precond_dim']) == (20, 20, 'adagrad', 512, 8192)
    # the defaults: 19 AdaGrad steps, then roots on steps 20, 40, ...
    W = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    opt, gen, recomputed = Shampoo([W]), torch.Generator().manual_seed(0), []
    for t in range(1, 61):
        W.grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        before = opt.state[W]['inv_pre_cond_0'].clone() if opt.state[W] else None
        opt.step()
        if before is not None and not torch.equal(before, opt.state[W]['inv_pre_cond_0']): recomputed.append(t)
    assert recomputed == [20, 40, 60]


def test_blocks_layout():
    assert shampoo_blocks((1024, 256), 8192, 512) == [(slice(0, 512), slice(0, 256)), (slice(512, 1024), slice(0, 256))]
    assert len(shampoo_blocks((1100, 600), 8192, 512)) == 3 * 2
    assert shampoo_blocks((2 ** 17,), 8192, 512) == [(slice(0, 2 ** 17),)]     # diagonal dimensions are not cut
    assert shampoo_blocks((1024, 256), 8192, None) == [(slice(0, 1024), slice(0, 256))]
    w = torch.zeros(1030, 4, requires_grad=True)
    opt = Shampoo([w])
    w.grad = torch.randn(1030, 4)
    opt.step()
    shapes = sorted(tuple(v.shape) for k, v in opt.state[w].items() if k.startswith('pre_cond'))
    assert shapes == sorted([(512, 512), (512, 512), (6, 6)] + [(4, 4)] * 3)


def test_blocks_are_independent_shampoos():
    "Without a graft, each block of the tensor moves exactly as Shampoo on that block alone"
    grads = _gradients((6, 4), 30, seed=5)
    whole = _run_ours(torch.zeros(6, 4, dtype=torch.float64), grads, lr=1e-2, **{**EXACT, 'block_size': 4})  # rows 0-3, 4-5
    for rows in (slice(0, 4), slice(4, 6)):
        alone = _run_ours(torch.zeros(rows.stop - rows.start, 4, dtype=torch.float64), [g[rows] for g in grads], lr=1e-2, **EXACT)
        assert max((a[rows] - b).abs().max().item() for a, b in zip(whole, alone)) < 1e-12


def _plain_quadratic(steps, **hypers):
    w = torch.randn(7, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = Shampoo([w], **{'lr': 0.1, 'momentum': 0.0, 'matrix_eps': 1e-4, 'preconditioning_compute_steps': 10, **hypers})
    ms = [w.detach().square().mean().item()]
    for _ in range(steps):
        w.grad = w.detach().clone()
        opt.step()
        ms.append(w.detach().square().mean().item())
    return ms


@pytest.mark.parametrize('hypers', [{}, dict(start_preconditioning_step=1), dict(graft_type='sgd'),
                                    dict(preconditioning_compute_steps=20)], ids=str)
def test_no_divergence_on_a_quadratic(hypers):
    "f = |p|²/2 on a 7-vector, lr 0.1, momentum 0, roots every 10 steps, matrix_eps 1e-4: bounded and descending"
    ms = _plain_quadratic(60, **hypers)
    assert all(math.isfinite(m) for m in ms)
    assert max(ms) <= ms[0] * (1 + 1e-6) and ms[-1] < 0.5 * ms[0]


def test_the_papers_rule_diverges_there():
    "Why the class refuses it: the same problem stepped by shampoo_update with no graft amplifies rounding ~10x a step"
    w = torch.randn(7, generator=torch.Generator().manual_seed(0))
    H, P, U = [1e-4 * torch.eye(7)], [torch.zeros(7, 7)], torch.zeros(7)
    ms = [w.square().mean().item()]
    for t in range(1, 11):
        w = w - 0.1 * shampoo_update(w.clone(), U, [H], [P], step=t, momentum=0.0, matrix_eps=1e-4, preconditioning_compute_steps=10)
        ms.append(w.square().mean().item())
    assert max(ms) > 100 * ms[0]


def test_blocked_state_resumes_exactly():
    torch.manual_seed(0)
    grads = [torch.randn(7, 5) for _ in range(30)]
    def run(split):
        w = torch.zeros(7, 5, requires_grad=True)
        opt = Shampoo([w], lr=0.1, block_size=3, start_preconditioning_step=4, preconditioning_compute_steps=5)
        for t, g in enumerate(grads):
            if t == split:
                saved, w_saved = opt.state_dict(), w.detach().clone()
                w = w_saved.clone().requires_grad_()
                opt = Shampoo([w], lr=0.1, block_size=3, start_preconditioning_step=4, preconditioning_compute_steps=5)
                opt.load_state_dict(saved)
            w.grad = g.clone()
            opt.step()
        return w.detach()
    assert torch.equal(run(split=None), run(split=12))


def test_zero_gradients_leave_blocked_weights_bit_identical():
    w = torch.randn(7, 5, requires_grad=True)
    opt = Shampoo([w], lr=0.1, block_size=3, start_preconditioning_step=2, preconditioning_compute_steps=2)
    for _ in range(5):
        before = w.detach().clone()
        w.grad = torch.zeros(7, 5)
        opt.step()
        assert torch.equal(before, w.detach())


@pytest.mark.parametrize('value', [0, -3, 0.5, 'big', float('nan')], ids=repr)
def test_bad_block_size_is_refused(value):
    with pytest.raises(ValueError) as err:
        Shampoo([torch.zeros(3, requires_grad=True)], block_size=value)
    message = str(err.value)
    assert 'Shampoo' in message and 'block_size' in message and ('big' in message if value == 'big' else str(value) in message)


# %% SOAP's blocks (chapter 65)

from optim_lab.optimizers.soap import SOAP


def _soap_iterates(shape, grads, **hypers):
    w = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    opt = SOAP([w], lr=1e-2, precondition_frequency=3, **hypers)
    out = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        out.append(w.detach().clone())
    return out, opt


@pytest.mark.parametrize('hypers', [dict(), dict(weight_decay=0.1, betas=(0.9, 0.99), shampoo_beta=0.8),
                                    dict(normalize_gradient=True, decoupled_wd=False, weight_decay=0.05)], ids=str)
def test_blocked_soap_is_soap_on_each_block(hypers):
    "SOAP (float64-checked in chapter 65 without blocks) run on each block alone gives the blocked SOAP's iterates"
    # (normalize_gradient too: with blocks, each block's direction is divided by its own RMS)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(9, 6, generator=gen, dtype=torch.float64) for _ in range(25)]
    blocked, opt = _soap_iterates((9, 6), grads, block_size=4, **hypers)
    keys = sorted(k for k in opt.state[next(iter(opt.state))] if k.startswith('GG'))
    assert len(keys) == 2 * 3 * 2                                   # rows 4+4+1, columns 4+2: six blocks, two factors each
    for rows in (slice(0, 4), slice(4, 8), slice(8, 9)):
        for cols in (slice(0, 4), slice(4, 6)):
            alone, _ = _soap_iterates((rows.stop - rows.start, cols.stop - cols.start), [g[rows, cols] for g in grads],
                                      block_size=None, **hypers)
            assert max((a[rows, cols] - b).abs().max().item() for a, b in zip(blocked, alone)) < 1e-12
    unblocked, _ = _soap_iterates((9, 6), grads, block_size=None, **hypers)
    assert max((a - b).abs().max().item() for a, b in zip(blocked, unblocked)) > 1e-3


def test_soap_defaults_and_plain_adam_vectors_stay_whole():
    w, v = torch.zeros(3, 3, requires_grad=True), torch.zeros(2000, requires_grad=True)
    opt = SOAP([w, v])
    g = opt.param_groups[0]
    assert (g['block_size'], g['precondition_frequency'], g['max_precondition_dim']) == (512, 10, 10000)
    w.grad, v.grad = torch.randn(3, 3), torch.randn(2000)
    opt.step()
    assert sorted(opt.state[v]) == ['exp_avg', 'exp_avg_sq', 'step']    # a long vector is plain Adam: no blocks


def test_blocked_soap_resumes_exactly():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(7, 5, generator=gen) for _ in range(20)]
    def run(split):
        w = torch.zeros(7, 5, requires_grad=True)
        opt = SOAP([w], lr=1e-2, block_size=3, precondition_frequency=2)
        for t, g in enumerate(grads):
            if t == split:
                saved, w = opt.state_dict(), w.detach().clone().requires_grad_()
                opt = SOAP([w], lr=1e-2, block_size=3, precondition_frequency=2)
                opt.load_state_dict(saved)
            w.grad = g.clone()
            opt.step()
        return w.detach()
    assert torch.equal(run(None), run(9))


@pytest.mark.parametrize('value', [0, 2.5 - 2, 'big'], ids=repr)
def test_soap_bad_block_size_is_refused(value):
    with pytest.raises(ValueError) as err:
        SOAP([torch.zeros(3, 3, requires_grad=True)], block_size=value)
    assert 'SOAP' in str(err.value) and 'block_size' in str(err.value)


# %% FSDP2: blocked Shampoo and SOAP, the sharded step against one process (identical full gradients on both sides)

DIST_SHAPES = [(5, 2, 3, 3), (3, 16), (9, 6), (7,)]   # uneven Shard(0) shards on 2 ranks; blocks of 4 cut every shape
DIST_STEPS = 10
DIST_OPTS = {'Shampoo': lambda ps: Shampoo(ps, lr=0.1, block_size=4, start_preconditioning_step=3, preconditioning_compute_steps=3),
             'SOAP': lambda ps: SOAP(ps, lr=1e-2, block_size=4, precondition_frequency=3, precondition_1d=True)}


def _dist_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(torch.Size(s).numel(), generator=gen).reshape(s) for s in DIST_SHAPES]


def _dist_run(name, shard=lambda t: t):
    params = [torch.nn.Parameter(shard(t)) for t in _dist_tensors(0)]
    opt = DIST_OPTS[name](params)
    for t in range(DIST_STEPS):
        for p, g in zip(params, _dist_tensors(t + 1)): p.grad = shard(g)
        opt.step()
    return params


def _dist_worker(mesh, out_dir):
    return {name: [p.full_tensor() for p in _dist_run(name, shard_rows(mesh))] for name in DIST_OPTS}


def test_blocked_fsdp2_step_equals_one_process(tmp_path):
    ranks = rank_results(__file__, tmp_path)
    for name in DIST_OPTS:
        one = _dist_run(name)
        assert max((p.detach() - q).abs().max().item() for p, q in zip(one, _dist_tensors(0))) > 1e-2   # it moved
        for r in ranks:
            dev = max((a - b.detach()).abs().max().item() for a, b in zip(r[name], one))
            assert dev < 1e-6, f'{name}: 2 ranks vs one process {dev:.2e}'


if is_rank(__name__): serve_rank(_dist_worker)
