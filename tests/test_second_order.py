"""The line-search, quasi-Newton, Newton and zeroth-order modules of `optim_lab.modular.m` (nbs/62_second_order.ipynb):
convergence against torchzero 0.4's step counts, exact solutions on a quadratic, zeroth-order modules that never ask for a
gradient, Polyak's formula, exact `state_dict` resume, and agreement with torchzero built from the same (name, kwargs) list."""
import copy

import pytest
import torch
import torchzero as tz

from optim_lab.modular import Modular, m
from optim_lab.problems import rosenbrock
from distributed_harness import chain_run, is_rank, rank_results, serve_rank, shard_rows

DT = torch.float64


def build(lib, params, spec):
    "The chain `spec` = [(module name, kwargs[, kwargs for optim_lab only]), ...] in optim_lab ('ours') or torchzero ('tz')"
    ns = m if lib == 'ours' else tz.m
    modules = [getattr(ns, name)(**kwargs, **(ours[0] if ours and lib == 'ours' else {})) for name, kwargs, *ours in spec]
    return Modular(params, *modules) if lib == 'ours' else tz.Optimizer(params, *modules)


def make_closure(opt, loss_fn, calls=None):
    "torchzero's closure convention; `calls` records the `backward` flag of every call"
    def closure(backward=True):
        if calls is not None: calls.append(backward)
        loss = loss_fn()
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    return closure


# ---------------------------------------------------------------- problems
def rosen(p): return rosenbrock(p[0], p[1])

def rosen_start(): return [torch.tensor([-1.5, 2.0], dtype=DT, requires_grad=True)]

_g = torch.Generator().manual_seed(0)
_Q = torch.randn(6, 6, generator=_g, dtype=DT)
A = _Q @ _Q.T + 0.5 * torch.eye(6, dtype=DT)               # strictly convex: eigenvalues >= 0.5
B = torch.randn(6, generator=_g, dtype=DT)
X_STAR = torch.linalg.solve(A, B)                          # float64 reference minimiser

def quad(ps):
    "½xᵀAx − bᵀx with x spread over a 2×2 matrix and a 2-vector"
    x = torch.cat([p.reshape(-1) for p in ps])
    return 0.5 * x @ A @ x - B @ x

def quad_start():
    return [torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=DT, requires_grad=True),
            torch.tensor([1.0, -1.0], dtype=DT, requires_grad=True)]

def vec(ps): return torch.cat([p.detach().reshape(-1) for p in ps])


def steps_to(lib, spec, loss_fn, params, tol, max_steps):
    "Steps until loss_fn(params) < tol (None if not within max_steps)"
    opt = build(lib, params, spec)
    closure = make_closure(opt, lambda: loss_fn(params))
    for k in range(1, max_steps + 1):
        opt.step(closure)
        with torch.no_grad():
            if loss_fn(params) < tol: return k
    return None


# ---------------------------------------------------------------- Rosenbrock against torchzero's step counts
ROSENBROCK_CHAINS = {
    'LBFGS+StrongWolfe': [('LBFGS', {}), ('StrongWolfe', {})],
    'BFGS+StrongWolfe': [('BFGS', {}), ('StrongWolfe', {})],
    'NewtonCG+StrongWolfe': [('NewtonCG', {}), ('StrongWolfe', {})],          # the defaults are torchzero's
}

@pytest.mark.parametrize('name', list(ROSENBROCK_CHAINS))
def test_rosenbrock_within_twice_torchzero(name):
    spec = ROSENBROCK_CHAINS[name]
    ours = steps_to('ours', spec, lambda ps: rosen(ps[0]), rosen_start(), 1e-8, 100)
    theirs = steps_to('tz', spec, lambda ps: rosen(ps[0]), rosen_start(), 1e-8, 100)
    print(f"{name}: optim_lab {ours} steps, torchzero {theirs} steps")
    assert ours is not None, f"{name} did not reach f < 1e-8 within 100 steps"
    assert theirs is not None
    assert ours <= 2 * theirs, (ours, theirs)


# ---------------------------------------------------------------- torchzero's README, Rosenbrock with NewtonCG
def test_readme_newton_cg_strong_wolfe_runs_with_the_import_swapped():
    "The README's block verbatim (float32, its closure and 20 steps) with `import torchzero as tz` swapped for ours"
    import optim_lab.modular as tz

    def rosen(x, y):
        return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2

    W = torch.tensor([-1.1, 2.5], requires_grad=True)

    def closure(backward=True):
        loss = rosen(*W)
        if backward:
            W.grad = None # same as opt.zero_grad()
            loss.backward()
        return loss

    opt = tz.Modular([W], tz.m.NewtonCG(), tz.m.StrongWolfe())
    for step in range(20):
        loss = opt.step(closure)
    # measured: the last reported loss 2.3e-8 here (the final point 3.7e-13), 1.7e-5 in torchzero 0.4.4, and 6.30 with
    # N&W's Alg. 7.1 (tol='forcing', npc_terminate=True, the defaults before they became torchzero's).
    # The bound is 40 times torchzero's result and far below the stall, so rounding on any CPU cannot cross it.
    assert float(rosen(*W.detach())) < 1e-3, float(rosen(*W.detach()))
    assert float(loss.detach()) < 1e-3                  # the last step's reported loss too


# ---------------------------------------------------------------- the quadratic over two tensors
# NewtonCG's default tolerance 1e-8 is absolute; the one-step landing on x* is checked with CG run to 1e-12
@pytest.mark.parametrize('module, kwargs, tol', [('Newton', {}, 1e-10), ('NewtonCG', dict(tol=1e-12), 1e-6)])
def test_newton_solves_quadratic_in_one_step(module, kwargs, tol):
    ps = quad_start()
    opt = build('ours', ps, [(module, kwargs)])
    opt.step(make_closure(opt, lambda: quad(ps)))
    assert torch.allclose(vec(ps), X_STAR, atol=tol, rtol=0), (vec(ps) - X_STAR).abs().max()


@pytest.mark.parametrize('spec', [[('BFGS', {}), ('Backtracking', {})], [('SR1', {}), ('Backtracking', {})],
                                  [('LBFGS', {}), ('StrongWolfe', {})]], ids=lambda s: '+'.join(n for n, _ in s))
def test_quasi_newton_solves_quadratic_within_40_steps(spec):
    ps = quad_start()
    opt = build('ours', ps, spec)
    closure = make_closure(opt, lambda: quad(ps))
    for k in range(40):
        opt.step(closure)
        if (vec(ps) - X_STAR).abs().max() < 1e-8: break
    assert (vec(ps) - X_STAR).abs().max() < 1e-8, (k, vec(ps) - X_STAR)


def test_newton_step_is_inverse_hessian_times_gradient():
    p = rosen_start()[0]
    H = torch.autograd.functional.hessian(rosen, p.detach())
    g = torch.autograd.grad(rosen(p), p)[0]
    expected = p.detach() - torch.linalg.solve(H, g)
    opt = build('ours', [p], [('Newton', {})])
    opt.step(make_closure(opt, lambda: rosen(p)))
    assert torch.allclose(p.detach(), expected, atol=1e-12, rtol=0)


def test_bfgs_inverse_satisfies_secant_equation():
    ps = quad_start()
    opt = build('ours', ps, [('BFGS', {}), ('Backtracking', {})])
    closure = make_closure(opt, lambda: quad(ps))
    x_prev = g_prev = None
    for _ in range(3):
        x = vec(ps)
        g = A @ x - B                                     # the exact gradient where the step starts
        if x_prev is not None: s, y = x - x_prev, g - g_prev
        x_prev, g_prev = x, g
        opt.step(closure)
    H = opt.modules[0].global_state['M']                  # last updated with the pair (x3 − x2, g3 − g2)
    assert torch.allclose(H @ y, s, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------- zeroth order
@pytest.mark.parametrize('spec', [[('FDM', {}), ('LR', dict(lr=0.05))],
                                  [('SPSA', dict(seed=0)), ('LR', dict(lr=0.02))],
                                  [('FDM', {}), ('Backtracking', {})],
                                  [('SPSA', dict(seed=0, n_samples=2)), ('Backtracking', dict(c=0))]],
                         ids=lambda s: '+'.join(n for n, _ in s))
def test_zeroth_order_only_evaluates_and_reduces_quadratic(spec):
    ps = quad_start()
    opt = build('ours', ps, spec)
    calls = []
    closure = make_closure(opt, lambda: quad(ps), calls)
    with torch.no_grad(): start = float(quad(ps))
    for _ in range(60): opt.step(closure)
    with torch.no_grad(): end = float(quad(ps))
    f_star = float(quad([X_STAR[:4].reshape(2, 2), X_STAR[4:]]))
    assert calls and not any(calls), "a zeroth-order chain called closure(backward=True)"
    assert end - f_star < 0.2 * (start - f_star), (start, end, f_star)


def test_fdm_matches_central_differences():
    ps = quad_start()
    opt = Modular(ps, m.FDM(h=1e-4, target='update'))
    from optim_lab.modular import Var
    var = Var(ps, [opt.param_groups[0]] * 2, make_closure(opt, lambda: quad(ps)), opt)
    est = torch.cat([u.reshape(-1) for u in opt.modules[0].step(var).update])
    x0 = vec(ps)
    def f(x): return float(quad([x[:4].reshape(2, 2), x[4:]]))
    ref = torch.tensor([(f(x0 + 1e-4 * e) - f(x0 - 1e-4 * e)) / 2e-4 for e in torch.eye(6, dtype=DT)], dtype=DT)
    assert torch.allclose(est, ref, atol=1e-9, rtol=0)
    assert torch.equal(vec(ps), x0)                      # every perturbation undone exactly


# ---------------------------------------------------------------- Polyak's step size
def test_polyak_matches_formula():
    ps = quad_start()
    f_star = float(quad([X_STAR[:4].reshape(2, 2), X_STAR[4:]]))
    opt = build('ours', ps, [('PolyakStepSize', dict(f_star=f_star, alpha=0.7))])
    closure = make_closure(opt, lambda: quad(ps))
    for _ in range(3):
        x = vec(ps)
        g = A @ x - B
        fx = float(0.5 * x @ A @ x - B @ x)
        expected = x - 0.7 * (fx - f_star) / (g @ g) * g
        opt.step(closure)
        assert torch.allclose(vec(ps), expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- state_dict
@pytest.mark.parametrize('spec', [[('LBFGS', {}), ('StrongWolfe', {})], [('BFGS', {}), ('Backtracking', {})],
                                  [('SPSA', dict(seed=3)), ('Backtracking', dict(c=0))],
                                  [('NewtonCG', dict(warm_start=True)), ('StrongWolfe', dict(a_init='quadratic'))]],
                         ids=lambda s: '+'.join(n for n, _ in s))
def test_state_dict_resume_is_bit_identical(spec):
    ps = rosen_start()
    opt = build('ours', ps, spec)
    closure = make_closure(opt, lambda: rosen(ps[0]))
    for _ in range(6): opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    qs = [p.detach().clone().requires_grad_(True) for p in ps]
    opt2 = build('ours', qs, spec)
    opt2.load_state_dict(saved)
    closure2 = make_closure(opt2, lambda: rosen(qs[0]))
    for _ in range(6):
        opt.step(closure); opt2.step(closure2)
        assert torch.equal(ps[0], qs[0])


# ---------------------------------------------------------------- agreement with torchzero where the semantics are plain
# SR1's `safeguard` (ours only) is switched off, and its skip tolerance set to torchzero's 1e-32, to compare with torchzero
PLAIN = [[('LBFGS', {}), ('Backtracking', {})], [('BFGS', {}), ('Backtracking', {})],
         [('SR1', {}, dict(safeguard=False, tol=1e-32)), ('Backtracking', {})],
         [('BFGS', dict(inverse=False)), ('Backtracking', {})], [('LBFGS', dict(history_size=3)), ('StrongWolfe', {})],
         [('BFGS', dict(scale_first=True, init_scale=2.0)), ('Backtracking', {})],
         [('BFGS', dict(concat_params=False, restart_interval=3)), ('Backtracking', {})],
         [('SR1', dict(inverse=False), dict(safeguard=False, tol=1e-32)), ('Backtracking', {})],
         [('LBFGS', dict(update_freq=2, scale_first=False)), ('Backtracking', dict(adaptive=False, beta=0.7))],
         [('Newton', {}), ('Backtracking', {})], [('Newton', dict(damping=1.0)), ('LR', dict(lr=0.5))],
         [('NewtonCG', dict(maxiter=1)), ('Backtracking', {})], [('Backtracking', {})],
         [('PolyakStepSize', {})], [('PolyakStepSize', dict(f_star=None, max=1.0))],
         [('FDM', {}), ('LR', dict(lr=1e-3))], [('FDM', dict(formula='forward')), ('Backtracking', {})]]

@pytest.mark.parametrize('spec', PLAIN, ids=lambda s: '+'.join(f"{n}{kw or ''}" for n, kw, *_ in s))
@pytest.mark.parametrize('problem', ['quadratic', 'rosenbrock'])
def test_agrees_with_torchzero(spec, problem):
    loss_fn, start = ((lambda ps: quad(ps)), quad_start) if problem == 'quadratic' else ((lambda ps: rosen(ps[0])), rosen_start)
    paths = {}
    for lib in ('ours', 'tz'):
        ps = start()
        opt = build(lib, ps, spec)
        closure = make_closure(opt, lambda: loss_fn(ps))
        path = []
        for _ in range(10):
            opt.step(closure)
            path.append(vec(ps))
        paths[lib] = torch.stack(path)
    dev = float((paths['ours'] - paths['tz']).abs().max())
    assert dev < 1e-6, dev


# ---------------------------------------------------------------- errors
def test_bad_hyperparameters_and_missing_closure():
    with pytest.raises(ValueError, match='StrongWolfe.*c2'): m.StrongWolfe(c1=0.5, c2=0.1)
    with pytest.raises(ValueError, match='Backtracking.*beta'): m.Backtracking(beta=1.5)
    with pytest.raises(ValueError, match='LBFGS.*history_size'): m.LBFGS(history_size=0)
    with pytest.raises(ValueError, match='FDM.*formula'): m.FDM(formula='sideways')
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    for module in (m.StrongWolfe(), m.Newton(), m.SPSA()):
        with pytest.raises(ValueError, match='closure'): Modular([p], module).step()
    assert torch.equal(p, torch.zeros(2))


# ---------------------------------------------------------------- settings of the quasi-Newton modules
@pytest.mark.parametrize('name', ['BFGS', 'SR1'])
@pytest.mark.parametrize('setting, value', [('init_scale', -1.0), ('init_scale', 'scalar'), ('tol', -1e-8),
                                            ('ptol', -1.0), ('restart_interval', 0), ('beta', 1.0),
                                            ('update_freq', 0), ('update_freq', 1.5), ('inverse', 'yes')])
def test_quasi_newton_settings_checked_in_the_constructor_and_in_param_groups(name, setting, value):
    "A bad value raises a ValueError naming the module, the setting, the value and the range: as an argument, in a group, written later"
    p = torch.nn.Parameter(torch.ones(3, dtype=DT))
    pattern = rf"{name}: {setting}={value!r} is outside the allowed range"
    with pytest.raises(ValueError, match=pattern): getattr(m, name)(**{setting: value})
    with pytest.raises(ValueError, match=pattern): Modular([{'params': [p], setting: value}], getattr(m, name)(), m.Backtracking())
    opt = Modular([p], getattr(m, name)(), m.Backtracking())
    with pytest.raises(ValueError, match=pattern): opt.param_groups[0][setting] = value


# The modules of chapter 62 act on all parameters at once and read their settings from the module: a group's other value
# would be ignored, so it is refused (the module and the setting named); the module's own value is accepted.
MODULE_WIDE = [('Backtracking', 'c', 0.5), ('StrongWolfe', 'c2', 0.5), ('BFGS', 'tol', 1e-3), ('SR1', 'init_scale', 2.0),
               ('LBFGS', 'history_size', 3), ('Newton', 'damping', 1.0), ('NewtonCG', 'tol', 1e-3),
               ('NewtonCG', 'npc_terminate', True)]

@pytest.mark.parametrize('name, setting, value', MODULE_WIDE)
def test_a_group_override_of_a_module_wide_setting_is_refused(name, setting, value):
    p, q = (torch.nn.Parameter(torch.ones(3, dtype=DT)) for _ in range(2))
    module = getattr(m, name)()
    pattern = rf"{name}: {setting}={value!r} in a param group is not supported"
    with pytest.raises(ValueError, match=pattern): Modular([{'params': [p], setting: value}], module)
    opt = Modular([p], module)
    with pytest.raises(ValueError, match=pattern): opt.add_param_group({'params': [q], setting: value})
    assert len(opt.param_groups) == 1                                  # refused before the group was added
    with pytest.raises(ValueError, match=pattern): opt.param_groups[0][setting] = value
    assert opt.param_groups[0].get(setting, module.defaults[setting]) == module.defaults[setting]
    Modular([{'params': [p], setting: module.defaults[setting]}], getattr(m, name)())   # the module's own value: accepted


def test_quasi_newton_accepts_its_documented_values():
    for kw in (dict(init_scale='auto'), dict(init_scale=2.0), dict(restart_interval='auto'), dict(restart_interval=None),
               dict(restart_interval=5), dict(beta=None), dict(beta=0.5), dict(ptol=None, gtol=None), dict(inverse=False)):
        m.BFGS(**kw); m.SR1(**kw)


# ---------------------------------------------------------------- initial_step_size on empty and sharded tensors
from optim_lab.modular.second_order import initial_step_size

SHARD_VECTORS = ([-3.0], [1e-3, 2.0, -0.5], [0.0])   # on 2 ranks: rank 1 holds nothing of the 1-element tensors


def step_size_reference(vectors, eps):
    "min(1, max(1/‖u‖₁, eps/max|u|)) in plain Python (1 for a zero update)"
    flat = [abs(x) for v in vectors for x in v]
    if max(flat, default=0.0) == 0: return 1.0
    return min(max(1 / sum(flat), max(eps, torch.finfo(DT).eps) / max(flat)), 1.0)


def test_initial_step_size_on_empty_and_zero_tensors():
    assert initial_step_size([torch.zeros(0, dtype=DT), torch.tensor([3.0, -4.0], dtype=DT)]) == pytest.approx(1 / 7, rel=1e-15)
    assert initial_step_size([torch.zeros(3, dtype=DT)]) == 1.0   # a zero update, no division by its max
    vs = [torch.tensor(v, dtype=DT) for v in SHARD_VECTORS]
    assert initial_step_size(vs, eps=1e-7) == pytest.approx(step_size_reference(SHARD_VECTORS, 1e-7), rel=1e-15)


# ---------------------------------------------------------------- FSDP2-style sharded parameters: 2 gloo ranks, DTensors sharded on dim 0
DIST_SPECS = {'Newton()': lambda: [m.Newton()],
              "Newton(hessian_method='autograd', damping=0.1)": lambda: [m.Newton(hessian_method='autograd', damping=0.1)],
              'Newton(eigval_fn=abs)': lambda: [m.Newton(eigval_fn=torch.abs)],
              'NewtonCG()': lambda: [m.NewtonCG()],
              "NewtonCG(tol='forcing', npc_terminate=True)": lambda: [m.NewtonCG(tol='forcing', npc_terminate=True)],
              "NewtonCG(hvp_method='fd_forward')": lambda: [m.NewtonCG(hvp_method='fd_forward')],
              'NewtonCG(maxiter=3, warm_start=True)': lambda: [m.NewtonCG(maxiter=3, warm_start=True, warm_beta=0.5)]}
DIST_SHAPES = ((5,), (3, 4), (1, 6))   # 5 rows on 2 ranks: 3 + 2 (uneven); one row: rank 1 holds none
DIST_TOL = 1e-12   # measured: 0 apart (the same products, one by one where one process batches them: the same values here); room for rounding in the collectives
DIST_STEPS = 2   # short of the minimiser (Newton's iterates are still ≥ 1e-2 from it), so a wrong product shows


def dist_run(make, shard=None, steps=DIST_STEPS):
    "`steps` steps of the chain, on the whole tensors' loss (`chain_run`); its last term couples a tensor's first and last rows"
    return chain_run(make(), lambda w: ((w - 0.5) ** 2).sum() + 0.5 * (w ** 4).sum() + w.sum() ** 2 + (w[:1] * w[-1:]).sum(),
                     DIST_SHAPES, steps, shard, DT)


def _worker(mesh, out_dir):
    us = [shard_rows(mesh)(torch.tensor(v, dtype=DT)) for v in SHARD_VECTORS]
    return {'initial_step_size': [initial_step_size(us, eps=eps) for eps in (None, 1e-7, 0.5)],
            **{name: dist_run(make, shard_rows(mesh)) for name, make in DIST_SPECS.items()}}


@pytest.fixture(scope='module')
def sharded_results(tmp_path_factory):
    return rank_results(__file__, tmp_path_factory.mktemp('ranks'))   # both ranks'


def test_initial_step_size_on_sharded_dtensors(sharded_results):
    "FSDP2 shards: rank 1 holds an empty shard of two tensors; both ranks' scale is the whole tensors' scale"
    for rank in sharded_results:
        for got, eps in zip(rank['initial_step_size'], (None, 1e-7, 0.5)):
            assert got == pytest.approx(step_size_reference(SHARD_VECTORS, eps or 0.0), rel=1e-15)


@pytest.mark.parametrize('name', list(DIST_SPECS))
def test_newton_on_sharded_parameters_ends_where_one_process_ends(name, sharded_results):
    """Newton and NewtonCG over the whole vector (the gradient gathered with its graph, each Hessian product taken through
    the gathering, the step re-sharded): on 2 ranks with uneven shards (3 + 2 rows, 1 + 0) both ranks end where one
    process ends. The sharded Hessian is taken one column at a time where one process batches them (vmap does not run on
    DTensors), so the two differ by rounding; TOL leaves room for that over 5 steps, far below the steps' size (the
    iterates move by O(0.1-1))"""
    ref = [torch.tensor(x, dtype=DT) for x in dist_run(DIST_SPECS[name])]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(0), dtype=DT) for s in DIST_SHAPES[:1]]
    assert (ref[0] - start[0]).abs().max() > 0.05                       # the run moved
    for rank in sharded_results:
        ours = [torch.tensor(x, dtype=DT) for x in rank[name]]
        assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= DIST_TOL


if is_rank(__name__): serve_rank(_worker)
