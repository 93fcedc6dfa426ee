"""The trust-region modules and line searches of `optim_lab.modular.m` (nbs/86_trust_region.ipynb): TrustCG against
torchzero 0.4.4 along whole float64 trajectories (Newton and quasi-Newton models, settings changed), Dogleg against a
float64 transcription of N&W eq. 4.16 and against torchzero where torchzero computes it, AdaptiveBacktracking and
ScipyMinimizeScalar against torchzero 0.4.4, signatures, bad arguments and state_dict resume."""
import copy
import inspect

import pytest
import torch

from optim_lab.modular import Modular, m
from distributed_harness import chain_run, is_rank, rank_results, serve_rank, shard_rows

WORKER = is_rank(__name__)   # a rank of the sharded test at the end: no torchzero needed
if not WORKER:
    tz = pytest.importorskip('torchzero')
DT = torch.float64

_g = torch.Generator().manual_seed(1)
_Q = torch.randn(6, 6, generator=_g, dtype=DT)
A6 = _Q @ _Q.T / 6 + 0.5 * torch.eye(6, dtype=DT)
B6 = torch.randn(6, generator=_g, dtype=DT)
X0 = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, -1.0], dtype=DT)
R0 = torch.tensor([-1.2, 1.0, -0.5, 1.5, 0.3, -0.8], dtype=DT)


def quartic(x): return 0.5 * x @ A6 @ x - B6 @ x + 0.1 * (x ** 4).sum()
def rosen(x): return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def path(make_opt, fn, steps, x0):
    "Iterates on fn with x spread over a 2x2 matrix and a 2-vector (ours or torchzero's optimizer)"
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


PAIRS = {
    'TrustCG(Newton)': (lambda: m.TrustCG(m.Newton()), lambda: tz.m.TrustCG(tz.m.Newton())),
    'TrustCG(Newton, damping, settings)': (
        lambda: m.TrustCG(m.Newton(damping=0.1), eta=0.1, nplus=2.0, rho_good=0.8, rho_bad=0.2, boundary_tol=None, init=0.3, maxiter=3),
        lambda: tz.m.TrustCG(tz.m.Newton(damping=0.1), eta=0.1, nplus=2.0, rho_good=0.8, rho_bad=0.2, boundary_tol=None, init=0.3, maxiter=3)),
    'TrustCG(SR1)': (lambda: m.TrustCG(m.SR1(inverse=False)), lambda: tz.m.TrustCG(tz.m.SR1(inverse=False))),
    'TrustCG(BFGS)': (lambda: m.TrustCG(m.BFGS(inverse=False)), lambda: tz.m.TrustCG(tz.m.BFGS(inverse=False))),
    'TrustCG(fixed radius)': (lambda: m.TrustCG(m.Newton(), radius_strategy='fixed', init=0.2),
                              lambda: tz.m.TrustCG(tz.m.Newton(), radius_strategy='fixed', init=0.2)),
    'TrustCG(update_freq=3, reg)': (lambda: m.TrustCG(m.Newton(), update_freq=3, reg=0.5),
                                    lambda: tz.m.TrustCG(tz.m.Newton(), update_freq=3, reg=0.5)),
    'AdaptiveBacktracking': (lambda: m.AdaptiveBacktracking(), lambda: tz.m.AdaptiveBacktracking()),
    'AdaptiveBacktracking(settings)': (lambda: m.AdaptiveBacktracking(init=3.0, beta=0.3, c=0.1, maxiter=6, nplus=3.0, scale_beta=0.5),
                                       lambda: tz.m.AdaptiveBacktracking(init=3.0, beta=0.3, c=0.1, maxiter=6, nplus=3.0, scale_beta=0.5)),
    'AdaptiveBacktracking(decrease)': (lambda: m.AdaptiveBacktracking(condition='decrease', c=0), lambda: tz.m.AdaptiveBacktracking(condition='decrease', c=0)),
    'ScipyMinimizeScalar': (lambda: m.ScipyMinimizeScalar(), lambda: tz.m.ScipyMinimizeScalar()),
    'ScipyMinimizeScalar(golden)': (lambda: m.ScipyMinimizeScalar('golden', tol=1e-6), lambda: tz.m.ScipyMinimizeScalar('golden', tol=1e-6)),
    'ScipyMinimizeScalar(bounded)': (lambda: m.ScipyMinimizeScalar('bounded', bounds=(0, 2)), lambda: tz.m.ScipyMinimizeScalar('bounded', bounds=(0, 2))),
    'ScipyMinimizeScalar(prev_init)': (lambda: m.ScipyMinimizeScalar(maxiter=8, prev_init=True), lambda: tz.m.ScipyMinimizeScalar(maxiter=8, prev_init=True)),
}


@pytest.mark.parametrize('name', list(PAIRS))
@pytest.mark.parametrize('problem', ['quartic', 'rosenbrock'])
def test_against_torchzero(name, problem):
    "The same iterates as torchzero 0.4.4 to 1e-7 over 25 steps (line searches behind L-BFGS-free steepest descent)"
    ours, theirs = PAIRS[name]
    fn, x0 = (quartic, X0) if problem == 'quartic' else (rosen, R0)
    a = path(lambda p: Modular(p, ours()), fn, 25, x0)
    b = path(lambda p: tz.Optimizer(p, theirs()), fn, 25, x0)
    assert (a - b).abs().max() < 1e-7
    assert fn(a[-1]) < fn(x0)


def test_line_search_not_last():
    "Before another module the line search scales the update (torchzero's convention): LBFGS then AdaptiveBacktracking then LR"
    a = path(lambda p: Modular(p, m.LBFGS(), m.AdaptiveBacktracking(), m.LR(0.5)), rosen, 12, R0)
    b = path(lambda p: tz.Optimizer(p, tz.m.LBFGS(), tz.m.AdaptiveBacktracking(), tz.m.LR(0.5)), rosen, 12, R0)
    assert (a - b).abs().max() < 1e-7


def test_trust_radius_matches_torchzero():
    "The radius after every step is torchzero's"
    x = X0.clone().requires_grad_(); y = X0.clone().requires_grad_()
    ours, theirs = m.TrustCG(m.Newton()), tz.m.TrustCG(tz.m.Newton())
    o1, o2 = Modular([x], ours), tz.Optimizer([y], theirs)
    for _ in range(15):
        for p, opt in ((x, o1), (y, o2)):
            def closure(backward=True, p=p, opt=opt):
                loss = rosen(p)
                if backward:
                    opt.zero_grad(); loss.backward()
                return loss
            opt.step(closure)
        assert abs(ours.global_state['trust_radius'] - theirs.global_state['trust_radius']) < 1e-9


# ---------------------------------------------------------------- Dogleg: the textbook
def dogleg_textbook(g, B, radius):
    "N&W eq. 4.16, written from the book; the Cauchy point (Alg. 4.2) when B is not positive definite"
    if torch.linalg.eigvalsh(B)[0] <= 0:
        gBg = g @ B @ g
        tau = 1.0 if gBg <= 0 else min(float(g.norm() ** 3 / (radius * gBg)), 1.0)
        return tau * radius * g / g.norm()
    pB = torch.linalg.solve(B, g)
    if pB.norm() <= radius: return pB
    pU = (g @ g) / (g @ B @ g) * g
    if pU.norm() >= radius: return radius * g / g.norm()
    # ‖pU + s(pB − pU)‖ = Δ, s in [0, 1]
    a, b, c = (pB - pU) @ (pB - pU), 2 * pU @ (pB - pU), pU @ pU - radius ** 2
    s = (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)
    return pU + s * (pB - pU)


def test_dogleg_step_cases():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        M = torch.randn(5, 5, generator=gen, dtype=DT)
        B = M @ M.T + 0.1 * torch.eye(5, dtype=DT)
        g = torch.randn(5, generator=gen, dtype=DT)
        for radius in (1e-3, 0.1, 0.5, 2.0, 50.0):
            torch.testing.assert_close(m.dogleg_step(g, B, radius), dogleg_textbook(g, B, radius), rtol=1e-10, atol=1e-12)


def test_dogleg_agrees_with_torchzero_on_the_second_leg():
    "Where the Cauchy point is inside and Newton's step outside, torchzero's step is the textbook's"
    gen = torch.Generator().manual_seed(4)
    n = 0
    for _ in range(30):
        M = torch.randn(5, 5, generator=gen, dtype=DT)
        B = M @ M.T + 0.1 * torch.eye(5, dtype=DT)
        g = torch.randn(5, generator=gen, dtype=DT)
        pU, pB = (g @ g) / (g @ B @ g) * g, torch.linalg.solve(B, g)
        radius = float(pU.norm() + pB.norm()) / 2
        if not (pU.norm() < radius < pB.norm()) or radius > 2: continue
        theirs = tz.m.Dogleg(tz.m.Newton()).trust_solve(f=0.0, g=g, H=tz.linalg.linear_operator.Dense(B), radius=radius,
                                                         params=[], closure=None, settings={})
        torch.testing.assert_close(m.dogleg_step(g, B, radius), theirs, rtol=1e-10, atol=1e-12)
        n += 1
    assert n >= 5


def test_dogleg_trajectory_against_transcription():
    "Dogleg(Newton) on Rosenbrock against N&W Alg. 4.1 with eq. 4.16 and the module's radius rule, attempt by attempt"
    def grad_hess(x):
        x = x.clone().requires_grad_()
        g = torch.autograd.grad(rosen(x), x, create_graph=True)[0]
        H = torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(len(x))])
        return g.detach(), H.detach()
    x, radius, ref = R0.clone(), 1.0, []
    for _ in range(30):
        g, B = grad_hess(x)
        d = dogleg_textbook(g, B, min(radius, 2.0))
        rho = float((rosen(x) - rosen(x - d)) / (g @ d - 0.5 * d @ B @ d))
        dn = float(d.norm())
        if rho < 0.25: radius = 0.25 * dn
        elif rho > 0.75: radius = max(radius, 2 * dn)
        if rho > 0: x = x - d
        ref.append(x.clone())
    p = R0.clone().requires_grad_()
    mod = m.Dogleg(m.Newton())
    opt = Modular([p], mod)
    def closure(backward=True):
        loss = rosen(p)
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    ours = []
    while len(ours) < len(ref):
        before = p.detach().clone()
        opt.step(closure)
        ours += [before] * (len(mod.global_state['rhos']) - 1) + [p.detach().clone()]
    assert len(ref) == 30
    assert (torch.stack(ours[:len(ref)]) - torch.stack(ref)).abs().max() < 1e-9


def test_dogleg_converges_where_torchzero_overshoots():
    a = path(lambda p: Modular(p, m.Dogleg(m.Newton())), quartic, 30, X0)
    assert quartic(a[-1]) < quartic(a[0])
    g = torch.autograd.functional.jacobian(quartic, a[-1])
    assert g.abs().max() < 1e-8


# ---------------------------------------------------------------- names, arguments, state
@pytest.mark.parametrize('name', ['TrustCG', 'Dogleg', 'AdaptiveBacktracking', 'ScipyMinimizeScalar'])
def test_signature(name):
    ours, theirs = inspect.signature(getattr(m, name)).parameters, inspect.signature(getattr(tz.m, name)).parameters
    assert [k for k in ours if k in theirs] == list(theirs)
    for k in theirs:
        if k != 'radius_strategy': assert ours[k].default == theirs[k].default, k
    assert list(ours)[:len(theirs)] == list(theirs)


def test_alias():
    assert m.TrustRegion is m.TrustCG


@pytest.mark.parametrize('make', [
    lambda: m.TrustCG(m.Newton(), nminus=1.5), lambda: m.TrustCG(m.Newton(), init=-1.0), lambda: m.TrustCG(m.Newton(), cg_tol=-1.0),
    lambda: m.TrustCG(m.Newton(), radius_strategy='dynamic'), lambda: m.TrustCG(m.Newton(), max_attempts=0),
    lambda: m.TrustCG(m.Newton(), boundary_tol=2.0), lambda: m.Dogleg(m.Newton(), max_radius=0),
    lambda: m.TrustCG(m.Adam()), lambda: m.Dogleg(m.BFGS()), lambda: m.TrustCG(m.SR1(inverse=False, concat_params=False)),
    lambda: m.AdaptiveBacktracking(beta=0), lambda: m.AdaptiveBacktracking(maxiter=0), lambda: m.AdaptiveBacktracking(condition='wolfe'),
    lambda: m.ScipyMinimizeScalar(method='newton'), lambda: m.ScipyMinimizeScalar(maxiter=0)])
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_param_group_override_checked():
    p = torch.zeros(3, requires_grad=True)
    opt = Modular([p], m.TrustCG(m.Newton()))
    with pytest.raises(ValueError, match='nminus'):
        opt.param_groups[0]['nminus'] = 2.0


def test_needs_closure():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    for mod in (m.TrustCG(m.Newton()), m.Dogleg(m.Newton()), m.AdaptiveBacktracking(), m.ScipyMinimizeScalar()):
        with pytest.raises(ValueError, match='closure'):
            Modular([p], mod).step()


@pytest.mark.parametrize('make', [lambda: [m.TrustCG(m.Newton(), update_freq=2)], lambda: [m.Dogleg(m.Newton())],
                                  lambda: [m.LBFGS(), m.AdaptiveBacktracking()], lambda: [m.ScipyMinimizeScalar(prev_init=True)]])
def test_state_dict_resume(make):
    "6 steps, save, load into a fresh optimizer, 6 more = 12 uninterrupted steps"
    def run(n1, n2):
        p = R0.clone().requires_grad_()
        opt = Modular([p], *make())
        def closure(backward=True):
            loss = rosen(p)
            if backward:
                opt.zero_grad(); loss.backward()
            return loss
        for _ in range(n1): opt.step(closure)
        if n2:
            sd = copy.deepcopy(opt.state_dict())
            q = p.detach().clone().requires_grad_()
            opt = Modular([q], *make()); opt.load_state_dict(sd); p = q
            def closure(backward=True):
                loss = rosen(p)
                if backward:
                    opt.zero_grad(); loss.backward()
                return loss
            for _ in range(n2): opt.step(closure)
        return p.detach()
    torch.testing.assert_close(run(6, 6), run(12, 0), rtol=0, atol=1e-12)


def test_float32_converges():
    "A float32 quadratic: TrustCG(Newton) reaches the minimiser"
    A = A6.float(); b = B6.float()
    p = torch.zeros(6, requires_grad=True)
    opt = Modular([p], m.TrustCG(m.Newton()))
    def closure(backward=True):
        loss = 0.5 * p @ A @ p - b @ p
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    for _ in range(20): opt.step(closure)
    torch.testing.assert_close(p.detach(), torch.linalg.solve(A, b), rtol=1e-4, atol=1e-4)


def test_readme_zeroth_order_chain_runs_with_the_import_swapped():
    "torchzero's README: GaussianSmoothing, NewtonCG(hvp_method='forward'), AdaptiveBacktracking(), verbatim but for the import"
    import torch
    from torch import nn
    import optim_lab.modular as tz
    torch.manual_seed(0)
    class Bench(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.tensor([-1.1, 2.5]))
        def forward(self): return (1 - self.x[0]) ** 2 + 100 * (self.x[1] - self.x[0] ** 2) ** 2
    bench = Bench()
    opt = tz.Modular(
        bench.parameters(),
        tz.m.GaussianSmoothing(h=0.01, n_samples=10),
        tz.m.NewtonCG(hvp_method='forward'),
        tz.m.AdaptiveBacktracking(),
    )
    def closure(backward=True):
        loss = bench()
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    first = float(closure(False).detach())
    for _ in range(30): opt.step(closure)
    assert float(closure(False).detach()) < 0.5 * first


def test_trust_region_readme_spellings_run():
    "tz.Optimizer(params, tz.m.TrustRegion(...)) and tz.m.TrustCG(hess_module=tz.m.Newton()) under the import swap"
    import optim_lab.modular as tz
    for make in (lambda: tz.m.TrustCG(hess_module=tz.m.Newton()), lambda: tz.m.TrustRegion(tz.m.Newton()),
                 lambda: tz.m.Dogleg(hess_module=tz.m.Newton())):
        x = R0.clone().requires_grad_()
        opt = tz.Optimizer([x], make())
        def closure(backward=True):
            loss = rosen(x)
            if backward:
                opt.zero_grad(); loss.backward()
            return loss
        for _ in range(40): opt.step(closure)
        g = torch.autograd.functional.jacobian(rosen, x.detach())
        assert rosen(x.detach()) < rosen(R0) and g.abs().max() < 1e-6   # a stationary point (6-D Rosenbrock has a local one)


# ---------------------------------------------------------------- FSDP2-style sharded parameters: 2 gloo ranks, DTensors sharded on dim 0
DIST_SPECS = {'TrustCG(Newton)': lambda: m.TrustCG(hess_module=m.Newton()), 'Dogleg(Newton)': lambda: m.Dogleg(hess_module=m.Newton()),
              'TrustCG(Newton, damping)': lambda: m.TrustCG(hess_module=m.Newton(damping=0.1), init=0.5),
              'TrustCG(SR1)': lambda: m.TrustCG(hess_module=m.SR1(inverse=False)), 'Dogleg(BFGS)': lambda: m.Dogleg(hess_module=m.BFGS(inverse=False))}
DIST_SHAPES = ((5,), (3, 4), (1, 6))   # 5 rows on 2 ranks: 3 + 2 (uneven); one row: rank 1 holds none


def dist_run(make, shard=None):
    "5 steps of the trust region, on the whole tensors' loss (`chain_run`)"
    return chain_run([make()], lambda w: ((w - 0.5) ** 2).sum() + 0.5 * (w ** 4).sum() + w.sum() ** 2, DIST_SHAPES, 5, shard, DT)


def _worker(mesh, out_dir):
    return {name: dist_run(make, shard_rows(mesh)) for name, make in DIST_SPECS.items()}


@pytest.fixture(scope='module')
def sharded_results(tmp_path_factory):
    return rank_results(__file__, tmp_path_factory.mktemp('ranks'))   # both ranks'


@pytest.mark.parametrize('name', list(DIST_SPECS))
def test_sharded_parameters_end_where_one_process_ends(name, sharded_results):
    """The model is over the whole vector (g gathered, H from the whole gradients or the quasi-Newton B updated from whole
    vectors, the step re-sharded): on 2 ranks with
    uneven shards both ranks end where one process ends. Measured: 0 apart; 1e-12 leaves room for rounding in the
    collectives, far below the steps' size (the iterates move by O(0.1-1))"""
    ref = [torch.tensor(x, dtype=DT) for x in dist_run(DIST_SPECS[name])]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(0), dtype=DT) for s in DIST_SHAPES[:1]]
    assert (ref[0] - start[0]).abs().max() > 0.05                       # the run moved
    for rank in sharded_results:
        ours = [torch.tensor(x, dtype=DT) for x in rank[name]]
        assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= 1e-12


if WORKER: serve_rank(_worker)
