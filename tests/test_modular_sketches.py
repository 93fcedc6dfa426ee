"""The sketch and full-matrix modules of `optim_lab.modular.m` (nbs/87_sketches.ipynb): torchzero 0.4.4 trajectories with
the same seeds wherever torchzero computes the papers' formulas; float64 transcriptions where it does not (full-rank
Nyström PCG, sketch-and-solve with a tiny reg, `truncate`, Shampoo's `inner`, debiasing); statistical checks of the
randomized pieces with fixed seeds; signatures, bad arguments, state_dict resume."""
import copy
import inspect
import math

import pytest
import torch

from optim_lab.modular import Modular, m
from distributed_harness import chain_run, is_rank, rank_results, serve_rank, shard_rows
from peer_versions import peer_is

WORKER = is_rank(__name__)   # a rank of the sharded test at the end: no torchzero needed
if not WORKER:
    tz = pytest.importorskip('torchzero')
DT = torch.float64

_g = torch.Generator().manual_seed(0)
_M = torch.randn(8, 8, generator=_g, dtype=DT)
A8 = _M @ _M.T / 8 + 0.1 * torch.eye(8, dtype=DT)
B8 = torch.randn(8, generator=_g, dtype=DT)
X8 = torch.randn(8, generator=_g, dtype=DT)
DH = torch.linspace(0.5, 5, 8, dtype=DT)


def quad(x): return 0.5 * x @ A8 @ x - B8 @ x
def quartic(x): return quad(x) + 0.05 * (x ** 4).sum()
def dquad(x): return 0.5 * (DH * x * x).sum() - B8 @ x


def path(make_opt, fn, steps, x0=X8):
    "Iterates with x spread over a 2x2 matrix and a 4-vector"
    ps = [x0[:4].reshape(2, 2).clone().requires_grad_(), x0[4:].clone().requires_grad_()]
    opt = make_opt(ps)
    def closure(backward=True):
        loss = fn(torch.cat([p.reshape(-1) for p in ps]))
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append(torch.cat([p.detach().reshape(-1) for p in ps]))
    return torch.stack(out)


def one_update(module, fn=quad, opt_cls=Modular):
    p = X8.clone().requires_grad_()
    opt = opt_cls([p], module)
    def closure(backward=True):
        loss = fn(p)
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    opt.step(closure)
    return X8 - p.detach()


PAIRS = {
    'SAS(4, reg=1)': ('NystromSketchAndSolve', dict(rank=4, reg=1.0, seed=0)),
    'SAS(8)': ('NystromSketchAndSolve', dict(rank=8, seed=0)),
    'SAS(8, reg=None)': ('NystromSketchAndSolve', dict(rank=8, reg=None, seed=0)),
    'SAS(5, damping)': ('NystromSketchAndSolve', dict(rank=5, reg=1.0, damping=0.1, seed=1)),
    'SAS(4, autograd)': ('NystromSketchAndSolve', dict(rank=4, reg=1.0, hvp_method='autograd', seed=0)),
    'SAS(4, fd_forward)': ('NystromSketchAndSolve', dict(rank=4, reg=1.0, hvp_method='fd_forward', seed=0)),
    'PCG(4)': ('NystromPCG', dict(rank=4, seed=0)),
    'FMA': ('FullMatrixAdagrad', dict()),
    'FMA(beta)': ('FullMatrixAdagrad', dict(beta=0.99)),
    'FMA(per param, zeros)': ('FullMatrixAdagrad', dict(concat_params=False, init='zeros', reg=1e-2)),
    'FMA(GGT, freq 2)': ('FullMatrixAdagrad', dict(init='GGT', precond_freq=2, reg=1e-2)),
    'Shampoo': ('Shampoo', dict()),
    'Shampoo(no merge, freq 1)': ('Shampoo', dict(merge_small=False, precond_freq=1)),
    'Shampoo(beta)': ('Shampoo', dict(precond_freq=1, beta=0.9)),
    'Shampoo(power)': ('Shampoo', dict(merge_small=False, precond_freq=2, matrix_power=-0.5, reg=1e-3)),
    'Shampoo(no 1d)': ('Shampoo', dict(precondition_1d=False, precond_freq=1)),
}


@pytest.mark.parametrize('name', list(PAIRS))
@pytest.mark.parametrize('fn', [quad, quartic], ids=['quad', 'quartic'])
def test_against_torchzero(name, fn):
    cls, kw = PAIRS[name]
    ours = path(lambda p: Modular(p, getattr(m, cls)(**kw), m.LR(0.3)), fn, 12)
    theirs = path(lambda p: tz.Optimizer(p, getattr(tz.m, cls)(**kw), tz.m.LR(0.3)), fn, 12)
    assert (ours - theirs).abs().max() < 1e-7


def test_full_matrix_adam_readme():
    "torchzero's README: FullMatrixAdagrad(beta=0.999, inner=EMA(0.9)) with Debias and LR is full-matrix Adam"
    ours = path(lambda p: Modular(p, m.FullMatrixAdagrad(beta=0.999, inner=m.EMA(0.9)), m.Debias(0.9, 0.999), m.LR(0.05)), quartic, 30)
    theirs = path(lambda p: tz.Optimizer(p, tz.m.FullMatrixAdagrad(beta=0.999, inner=tz.m.EMA(0.9)), tz.m.Debias(0.9, 0.999), tz.m.LR(0.05)), quartic, 30)
    assert (ours - theirs).abs().max() < 1e-7
    assert quartic(ours[-1]) < quartic(X8)


@pytest.mark.parametrize('kw', [dict(), dict(update_freq=3, precond_scale=2.0, clip=0.5), dict(n_samples=3, beta1=0.5)])
def test_sophia_h_against_torchzero_and_formula(kw):
    "Rademacher probes on a diagonal Hessian: z ⊙ Hz = diag H exactly, so the run is deterministic"
    ours = path(lambda p: Modular(p, m.SophiaH(distribution='rademacher', **kw), m.LR(0.1)), dquad, 30)
    theirs = path(lambda p: tz.Optimizer(p, tz.m.SophiaH(distribution='rademacher', **kw), tz.m.LR(0.1)), dquad, 30)
    assert (ours - theirs).abs().max() < 1e-7
    b1, k, rho, c = kw.get('beta1', 0.96), kw.get('update_freq', 10), kw.get('precond_scale', 1.0), kw.get('clip', 1.0)
    x, mom, h = X8.clone(), torch.zeros(8, dtype=DT), torch.zeros(8, dtype=DT)
    for t in range(30):
        g = DH * x - B8
        if t % k == 0: h = 0.99 * h + 0.01 * DH
        mom = b1 * mom + (1 - b1) * g
        x = x - 0.1 * (mom / (rho * h).clamp_min(1e-12)).clamp(-c, c)
        torch.testing.assert_close(ours[t], x, rtol=0, atol=1e-12)


def test_sophia_h_debias_formula():
    "debias=True: clip(m̂/ĥ) with m̂ = m/(1 − β1ᵗ), ĥ = h/(1 − β2^estimates); the first step is clip(g / diag H)"
    d = one_update(m.SophiaH(distribution='rademacher', debias=True), dquad)
    torch.testing.assert_close(d, ((DH * X8 - B8) / DH).clamp(-1, 1), rtol=0, atol=1e-12)


def test_hutchinson_gaussian_unbiased():
    "Gaussian probes: the mean of 4000 estimates is diag H within 4 standard errors (fixed seed)"
    p = X8.clone().requires_grad_()
    opt = Modular([p], m.SophiaH(update_freq=1, n_samples=4000, beta2=0.0, seed=1))
    def closure(backward=True):
        loss = quartic(p)
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    opt.step(closure)
    H = torch.autograd.functional.hessian(quartic, X8)
    D = opt.state[p]['0.SophiaH']['D_exp_avg']
    se = torch.sqrt((H ** 2).sum(1) + H.diagonal() ** 2) / math.sqrt(4000)
    assert ((D - H.diagonal()).abs() < 4 * se).all()


# ---------------------------------------------------------------- the textbook where torchzero departs
def test_nystrom_exact_formula_one_sample():
    "One draw: the stable factorisation equals Y (ΩᵀY)⁻¹ Yᵀ"
    gen = torch.Generator().manual_seed(7)
    Om = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=DT)).Q
    Y = A8 @ Om
    L, U = m.nystrom_approximation(Om, Y)
    torch.testing.assert_close((U * L) @ U.T, Y @ torch.linalg.solve(Om.T @ Y, Y.T), rtol=0, atol=1e-12)
    assert (L[1:] >= L[:-1]).all()


def test_nystrom_error_statistics():
    "Over 30 seeded draws: spectral error ≥ λ_(k+1) every time; mean trace-norm error below Tropp et al.'s expectation bound"
    eigs = 10 * 0.7 ** torch.arange(30, dtype=DT)
    Qr, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=DT))
    H = (Qr * eigs) @ Qr.T
    k, r = 10, 4
    nuc = []
    for seed in range(30):
        Om = torch.linalg.qr(torch.randn(30, k, generator=torch.Generator().manual_seed(50 + seed), dtype=DT)).Q
        L, U = m.nystrom_approximation(Om, H @ Om)
        E = H - (U * L) @ U.T
        assert torch.linalg.matrix_norm(E, ord=2) >= eigs[k] * (1 - 1e-9)
        nuc.append(float(torch.linalg.matrix_norm(E, ord='nuc')))
    assert sum(nuc) / len(nuc) < (1 + r / (k - r - 1)) * float(eigs[r:].sum())


def test_pcg_full_rank_is_newton():
    "At full rank Nyström PCG gives (H + μI)⁻¹g (torchzero 0.4.4 does not: it sketches with the unorthogonalised Ω)"
    target = torch.linalg.solve(A8 + 1e-6 * torch.eye(8, dtype=DT), A8 @ X8 - B8)
    ours = one_update(m.NystromPCG(8, seed=0))
    theirs = one_update(tz.m.NystromPCG(8, seed=0), opt_cls=tz.Optimizer)
    assert (ours - target).norm() / target.norm() < 1e-10
    if peer_is('torchzero'):
        assert (theirs - target).norm() / target.norm() > 1e-3


@pytest.mark.parametrize('reg', [1e-6, 1e-10, 1e-13])
def test_sketch_and_solve_full_rank_tiny_reg(reg):
    "Full rank: (H + μI)⁻¹g to rounding whatever μ (torchzero's complement term adds ε‖g‖/μ)"
    target = torch.linalg.solve(A8 + reg * torch.eye(8, dtype=DT), A8 @ X8 - B8)
    ours = one_update(m.NystromSketchAndSolve(8, reg=reg, seed=0))
    assert (ours - target).norm() / target.norm() < 1e-11


def test_sketch_and_solve_low_rank_formula():
    "Rank k < n: Q(L + μ)⁻¹Qᵀg + (g − QQᵀg)/μ, the inverse of the approximation plus μI"
    mod = m.NystromSketchAndSolve(3, reg=0.5, seed=4)
    d = one_update(mod)
    L, Q = mod.global_state['L'], mod.global_state['Q']
    g = A8 @ X8 - B8
    torch.testing.assert_close(d, torch.linalg.solve((Q * L) @ Q.T + 0.5 * torch.eye(8, dtype=DT), g), rtol=1e-10, atol=1e-12)


def test_update_freq_keeps_the_sketch():
    """update_freq=3: steps 2 and 3 solve with the first step's eigenvalues unchanged (torchzero 0.4.4 adds reg to its stored
    eigenvalues in place at every solve, so they drift by reg per step)"""
    for cls, opt_cls in ((m.NystromSketchAndSolve, Modular), (tz.m.NystromSketchAndSolve, tz.Optimizer)):
        mod = cls(4, reg=0.5, update_freq=3, seed=2)
        p = X8.clone().requires_grad_()
        opt = opt_cls([p], mod, (m.LR if opt_cls is Modular else tz.m.LR)(0.3))
        def closure(backward=True):
            loss = quad(p)
            if backward:
                opt.zero_grad(); loss.backward()
            return loss
        Ls = []
        for _ in range(3):
            opt.step(closure); Ls.append(mod.global_state['L'].clone())
        drift = float((Ls[2] - Ls[0]).abs().max())
        if opt_cls is Modular: assert drift == 0
        else: assert abs(drift - 2 * 0.5) < 1e-12


def test_truncate_keeps_largest():
    L8, Q8 = torch.linalg.eigh(A8)
    g = A8 @ X8 - B8
    d = one_update(m.NystromSketchAndSolve(8, reg=None, truncate=2, seed=0))
    top = Q8[:, -2:]
    torch.testing.assert_close(d, top @ ((top.T @ g) / L8[-2:]), rtol=1e-9, atol=1e-12)


def test_full_matrix_adagrad_formula_general_power():
    "(G/(1 − βᵗ))^p with p = −1/4 (torchzero rescales by (1 − βᵗ)^(1/2) for every p)"
    x, G = X8.clone(), torch.eye(8, dtype=DT)
    ours = path(lambda p: Modular(p, m.FullMatrixAdagrad(beta=0.9, matrix_power=-0.25), m.LR(0.1)), quartic, 25)
    for t in range(1, 26):
        g = torch.autograd.functional.jacobian(quartic, x)
        G = 0.9 * G + 0.1 * torch.outer(g, g)
        L, Q = torch.linalg.eigh(G + 1e-12 * torch.eye(8, dtype=DT))
        x = x - 0.1 * (Q * L ** -0.25) @ Q.T @ g * (1 - 0.9 ** t) ** 0.25
        torch.testing.assert_close(ours[t - 1], x, rtol=0, atol=1e-10)


def test_shampoo_against_gupta():
    "A 4x3 matrix without merging: W ← W − lr·L^(−1/4) G R^(−1/4), L = I + ΣGGᵀ, R = I + ΣGᵀG, roots every 2 steps"
    gen = torch.Generator().manual_seed(9)
    A = torch.randn(4, 4, generator=gen, dtype=DT); A = A @ A.T / 4 + 0.3 * torch.eye(4, dtype=DT)
    B = torch.randn(4, 3, generator=gen, dtype=DT); W0 = torch.randn(4, 3, generator=gen, dtype=DT)
    f = lambda W: 0.5 * (W * (A @ W)).sum() - (B * W).sum() + 0.05 * (W ** 4).sum()
    p = W0.clone().requires_grad_()
    opt = Modular([p], m.Shampoo(merge_small=False, precond_freq=2), m.LR(0.1))
    def closure(backward=True):
        loss = f(p)
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    root = lambda M: (lambda L, Q: (Q * L ** -0.25) @ Q.T)(*torch.linalg.eigh(M))
    W, Lacc, Racc = W0.clone(), torch.eye(4, dtype=DT), torch.eye(3, dtype=DT)
    for t in range(25):
        opt.step(closure)
        G = torch.autograd.functional.jacobian(f, W)
        Lacc, Racc = Lacc + G @ G.T, Racc + G.T @ G
        if t % 2 == 0: PL, PR = root(Lacc), root(Racc)
        W = W - 0.1 * PL @ G @ PR
        torch.testing.assert_close(p.detach(), W, rtol=0, atol=1e-10)


def test_shampoo_inner_is_preconditioned():
    "Shampoo(inner=EMA) preconditions the EMA's output (torchzero 0.4.4 drops it and preconditions the raw update)"
    # with inner=Add(Identity()) (u + u) the update is exactly twice the plain one (the accumulators see the same gradients)
    doubled = path(lambda p: Modular(p, m.Shampoo(precond_freq=1, inner=m.Add(m.Identity())), m.LR(0.05)), quartic, 1)
    plain = path(lambda p: Modular(p, m.Shampoo(precond_freq=1), m.LR(0.05)), quartic, 1)
    torch.testing.assert_close(X8 - doubled[0], 2 * (X8 - plain[0]), rtol=0, atol=1e-12)
    a = path(lambda p: Modular(p, m.Shampoo(precond_freq=1, inner=m.EMA(0.9)), m.LR(0.05)), quartic, 8)
    b = path(lambda p: Modular(p, m.Shampoo(precond_freq=1), m.LR(0.05)), quartic, 8)
    assert (a - b).abs().max() > 1e-4
    t1 = path(lambda p: tz.Optimizer(p, tz.m.Shampoo(precond_freq=1, inner=tz.m.EMA(0.9)), tz.m.LR(0.05)), quartic, 8)
    t2 = path(lambda p: tz.Optimizer(p, tz.m.Shampoo(precond_freq=1), tz.m.LR(0.05)), quartic, 8)
    assert (t1 - t2).abs().max() == 0


@pytest.mark.parametrize('shape,kw', [((1,), {}), ((30,), dict(max_dim=20)), ((), {})])
def test_shampoo_diagonal_fallback(shape, kw):
    "No dimension gets an accumulator: diagonal Adagrad, u/(√Σu² + ε)"
    p = torch.full(shape, 2.0, dtype=DT, requires_grad=True)
    opt = Modular([p], m.Shampoo(**kw))
    for k in range(1, 4):
        p.grad = torch.full(shape, 3.0, dtype=DT)
        before = p.detach().clone()
        opt.step()
        torch.testing.assert_close(before - p.detach(), torch.full(shape, 3.0 / (math.sqrt(9 * k) + 1e-8), dtype=DT))


def test_merge_small_dims():
    assert m.merge_small_dims((5, 3), 10_000) == ([1, 0], [15])
    assert m.merge_small_dims((20000, 5), 10_000) == ([1, 0], [5, 20000])
    assert m.merge_small_dims((50000, 20000), 10_000) == ([], [50000, 20000])
    assert m.merge_small_dims((4, 100, 3), 20) == ([2, 0, 1], [12, 100])


# ---------------------------------------------------------------- names, arguments, state
@pytest.mark.parametrize('name', ['NystromSketchAndSolve', 'NystromPCG', 'FullMatrixAdagrad', 'Shampoo', 'SophiaH'])
def test_signature(name):
    ours, theirs = inspect.signature(getattr(m, name)).parameters, inspect.signature(getattr(tz.m, name)).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in theirs)


@pytest.mark.parametrize('make', [
    lambda: m.NystromSketchAndSolve(rank=0), lambda: m.NystromSketchAndSolve(reg=-1.0), lambda: m.NystromSketchAndSolve(orthogonalize_method='svd'),
    lambda: m.NystromPCG(reg=-1.0), lambda: m.NystromPCG(hvp_method='fd'), lambda: m.FullMatrixAdagrad(init='ones'),
    lambda: m.FullMatrixAdagrad(beta=1.0), lambda: m.FullMatrixAdagrad(matrix_power=0), lambda: m.FullMatrixAdagrad(inner=3),
    lambda: m.FullMatrixAdagrad(accumulator_tfm=m.EMA()), lambda: m.Shampoo(precond_freq=0), lambda: m.Shampoo(max_dim=0),
    lambda: m.SophiaH(beta2=1.0), lambda: m.SophiaH(clip=0), lambda: m.SophiaH(distribution='uniform'), lambda: m.SophiaH(zHz=False)])
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_needs_closure():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    for mod in (m.NystromSketchAndSolve(2), m.NystromPCG(2), m.SophiaH()):
        with pytest.raises(ValueError, match='closure'):
            Modular([p], mod).step()


@pytest.mark.parametrize('make', [lambda: [m.NystromSketchAndSolve(3, reg=1.0, update_freq=2, seed=0), m.LR(0.3)],
                                  lambda: [m.NystromPCG(3, update_freq=2, seed=0), m.LR(0.3)],
                                  lambda: [m.FullMatrixAdagrad(beta=0.99, precond_freq=3), m.LR(0.1)],
                                  lambda: [m.Shampoo(precond_freq=3, beta=0.9), m.LR(0.1)],
                                  lambda: [m.SophiaH(update_freq=2, seed=0), m.LR(0.1)]])
def test_state_dict_resume(make):
    "5 steps, save, load into a fresh optimizer, 5 more = 10 uninterrupted steps (seeded draws resume too)"
    def run(n1, n2):
        ps = [X8[:4].reshape(2, 2).clone().requires_grad_(), X8[4:].clone().requires_grad_()]
        opt = Modular(ps, *make())
        def closure(backward=True):
            loss = quartic(torch.cat([p.reshape(-1) for p in ps]))
            if backward:
                opt.zero_grad(); loss.backward()
            return loss
        for _ in range(n1): opt.step(closure)
        if n2:
            sd = copy.deepcopy(opt.state_dict())
            qs = [p.detach().clone().requires_grad_() for p in ps]
            opt = Modular(qs, *make()); opt.load_state_dict(sd)
            ps[:] = qs
            for _ in range(n2): opt.step(closure)
        return torch.cat([p.detach().reshape(-1) for p in ps])
    torch.testing.assert_close(run(5, 5), run(10, 0), rtol=0, atol=1e-12)


def test_float32_training():
    "float32: each module lowers a quartic"
    for mods in ([m.NystromPCG(4, seed=0), m.LR(0.5)], [m.NystromSketchAndSolve(8, seed=0), m.LR(0.5)], [m.FullMatrixAdagrad(), m.LR(0.1)],
                 [m.Shampoo(), m.LR(0.1)], [m.SophiaH(seed=0), m.LR(0.1)]):
        x = path(lambda p: Modular(p, *mods), lambda v: quartic(v.double()).float(), 20, X8.float())
        assert quartic(x[-1].double()) < quartic(X8) - 0.5


@pytest.mark.parametrize('hvp_method', ['batched_autograd', 'autograd'])
def test_one_closure_evaluation_per_step(hvp_method):
    "The sketch and every CG product differentiate one gradient graph: NystromPCG evaluates the closure once a step, as torchzero"
    counts = {}
    for lib, opt_cls in (('ours', Modular), ('torchzero', tz.Optimizer)):
        L = m if lib == 'ours' else tz.m
        x = X8.clone().requires_grad_()
        opt = opt_cls([x], L.NystromPCG(4, hvp_method=hvp_method, seed=0), L.LR(0.5))
        calls = [0]
        def closure(backward=True):
            calls[0] += 1
            loss = quartic(x)
            if backward:
                opt.zero_grad(); loss.backward()
            return loss
        for _ in range(5): opt.step(closure)
        counts[lib] = calls[0]
    assert counts == {'ours': 5, 'torchzero': 5}

def test_readme_full_matrix_recipes_run_with_the_import_swapped():
    "torchzero's README: full-matrix Adam as FullMatrixAdagrad(beta=0.999, inner=EMA(0.9)), and GraftModules(Shampoo(), RMSprop())"
    import torch
    from torch import nn
    import optim_lab.modular as tz
    for chain in (lambda: [tz.m.FullMatrixAdagrad(beta=0.999, inner=tz.m.EMA(0.9)), tz.m.LR(1e-2)],
                  lambda: [tz.m.GraftModules(tz.m.Shampoo(), tz.m.RMSprop()), tz.m.LR(1e-2)]):
        torch.manual_seed(0)
        model = nn.Linear(10, 1)
        inputs, targets = torch.randn(20, 10), torch.randn(20, 1)
        optimizer = tz.Modular(model.parameters(), *chain())
        losses = []
        for _ in range(100):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.8 * losses[0]



# ---------------------------------------------------------------- FSDP2-style sharded parameters: 2 gloo ranks, DTensors sharded on dim 0
DIST_SPECS = {'FullMatrixAdagrad': [('FullMatrixAdagrad', {})], 'FullMatrixAdagrad-per-param': [('FullMatrixAdagrad', dict(concat_params=False))],
              'Shampoo': [('Shampoo', dict(precond_freq=2))], 'Shampoo-no-merge': [('Shampoo', dict(precond_freq=2, merge_small=False, beta=0.9))]}
DIST_SHAPES = ((5,), (3, 4), (1, 6))   # 5 rows on 2 ranks: 3 + 2; one row: rank 1 holds none


def dist_run(spec, shard=None):
    "6 steps; `shard(t)` makes a parameter's tensor a DTensor on the 2 ranks (None: one process)"
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=g, dtype=DT) for s in DIST_SHAPES]
    ps = [torch.nn.Parameter(shard(t) if shard else t.clone()) for t in full]
    opt = Modular(ps, *[getattr(m, n)(**kw) for n, kw in spec], m.LR(0.1))
    for t in range(6):
        whole = [(p.full_tensor() if shard else p.detach()).clone().requires_grad_() for p in ps]
        loss = sum(((w - 0.5) ** 2).sum() * (1 + t % 3) + (w ** 4).sum() + w.sum() ** 2 for w in whole)
        for p, gr in zip(ps, torch.autograd.grad(loss, whole)): p.grad = shard(gr) if shard else gr
        opt.step()
    return [(p.full_tensor() if shard else p.detach()).tolist() for p in ps]


# the closure-based modules: Hessian products through a closure whose loss is computed on the whole tensors
CLOSURE_SPECS = {'NystromSketchAndSolve': [('NystromSketchAndSolve', dict(rank=6, reg=1.0, seed=0))],
                 'NystromSketchAndSolve-autograd': [('NystromSketchAndSolve', dict(rank=6, reg=1.0, hvp_method='autograd', seed=0))],
                 'NystromSketchAndSolve-full-rank': [('NystromSketchAndSolve', dict(rank=23, reg=1e-3, seed=1))],
                 'NystromPCG': [('NystromPCG', dict(rank=6, seed=0))],
                 'NystromPCG-autograd': [('NystromPCG', dict(rank=6, hvp_method='autograd', seed=0))],
                 'SophiaH': [('SophiaH', dict(update_freq=2, seed=0))],
                 'SophiaH-rademacher': [('SophiaH', dict(update_freq=1, distribution='rademacher', n_samples=2, seed=3))]}


def closure_run(spec, shard=None):
    "5 steps of the spec's modules then LR(0.1), on the whole tensors' loss (`chain_run`)"
    return chain_run([*[getattr(m, n)(**kw) for n, kw in spec], m.LR(0.1)],
                     lambda w: ((w - 0.5) ** 2).sum() + (w ** 4).sum() + w.sum() ** 2, DIST_SHAPES, 5, shard, DT)


# the finite-difference products: the gradient gathered whole, each rank's slice of h·v/‖v‖ moved (62's fd_forward_hvp)
FD_SPECS = {f'{name}-{fd}': [(name, dict(rank=6, reg=1.0, hvp_method=fd, seed=0))]
            for name in ('NystromSketchAndSolve', 'NystromPCG') for fd in ('fd_forward', 'fd_central')}


def _worker(mesh, out_dir):
    return {**{name: dist_run(spec, shard_rows(mesh)) for name, spec in DIST_SPECS.items()},
            **{name: closure_run(spec, shard_rows(mesh)) for name, spec in {**CLOSURE_SPECS, **FD_SPECS}.items()}}


@pytest.fixture(scope='module')
def sharded_results(tmp_path_factory):
    return rank_results(__file__, tmp_path_factory.mktemp('ranks'))[0]   # rank 0's


@pytest.mark.parametrize('name', list(DIST_SPECS))
def test_sharded_parameters_end_where_one_process_ends(name, sharded_results):
    "The full-matrix preconditioners gather the whole update: 2 ranks agree with one process"
    ours = [torch.tensor(x, dtype=DT) for x in sharded_results[name]]
    ref = [torch.tensor(x, dtype=DT) for x in dist_run(DIST_SPECS[name])]
    assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= 1e-12



@pytest.mark.parametrize('name', list(CLOSURE_SPECS))
def test_sharded_closure_modules_end_where_one_process_ends(name, sharded_results):
    """The Nyström sketch (Ω drawn on the whole vector, products on the whole gradients) and SophiaH's probes (drawn on the
    whole shape, then sharded) on 2 ranks with uneven shards: rank 0 ends where one process ends. Measured: 0 apart (they
    crashed on uneven shards before); 1e-12 leaves room for rounding, far below the 5 steps' movement (asserted > 0.01).
    NystromPCG with batched products: one process computes them by vmap, shards column by column (vmap does not run on
    DTensors); CG carries that rounding (1e-16) through its iterations: measured 3.1e-10, bound 1e-8. The same bound for
    NystromPCG with autograd products: 0 apart when every process runs one torch thread, 3.2e-11 when the ranks run two
    (each reduction sums in another order, and CG carries it)"""
    ours = [torch.tensor(x, dtype=DT) for x in sharded_results[name]]
    ref = [torch.tensor(x, dtype=DT) for x in closure_run(CLOSURE_SPECS[name])]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g, dtype=DT) for s in DIST_SHAPES]
    assert max((a - b).abs().max().item() for a, b in zip(ref, start)) > 0.01
    assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= (1e-8 if name.startswith('NystromPCG') else 1e-12)


@pytest.mark.parametrize('name', list(FD_SPECS))
def test_sharded_finite_difference_products_end_where_one_process_ends(name, sharded_results):
    """hvp_method='fd_forward'/'fd_central' on 2 ranks with uneven shards: g₀ and each perturbed gradient gathered whole,
    the perturbation written back slice by slice, so every product is the one process's. Measured: 0 apart (refused
    before); 1e-12 leaves room for rounding, far below the 5 steps' movement (asserted > 0.01)"""
    ours = [torch.tensor(x, dtype=DT) for x in sharded_results[name]]
    ref = [torch.tensor(x, dtype=DT) for x in closure_run(FD_SPECS[name])]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g, dtype=DT) for s in DIST_SHAPES]
    assert max((a - b).abs().max().item() for a, b in zip(ref, start)) > 0.01
    assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= 1e-12


if WORKER: serve_rank(_worker)
