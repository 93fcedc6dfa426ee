"""The gradient estimators of `optim_lab.modular.m` (nbs/69_gradient_estimators.ipynb): RandomizedFDM, RDSA,
GaussianSmoothing, MeZO, ForwardGradient, and NewtonCG(hvp_method='fd_forward').

- against torchzero 0.4.4 along 20-step float64 trajectories, from the same state of torch's generator (both draw the
  directions parameter after parameter with the same calls, so the draws are identical);
- one sample against float64 transcriptions of the papers (Spall's SPSA, Nesterov–Spokoiny, Malladi et al. Alg. 1,
  Baydin et al.);
- statistically: the mean against the exact expected mean on a known function, the variance against (n + κ − 2)‖g‖²;
- no backward pass ever; torchzero's signatures; bad arguments raise ValueError."""
import inspect
import warnings

import pytest
import torch

from optim_lab.modular import Modular, m
from optim_lab.problems import rosenbrock
from distributed_harness import chain_run, is_rank, rank_results, serve_rank, shard_rows

WORKER = is_rank(__name__)   # a rank of the sharded test at the end: no torchzero needed
if not WORKER:
    import torchzero as tz

warnings.filterwarnings('ignore', module='torchzero')
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')  # torch.func's first jvp
DT = torch.float64
NAMES = ['RandomizedFDM', 'RDSA', 'GaussianSmoothing', 'MeZO', 'ForwardGradient']

_g = torch.Generator().manual_seed(0)
_Q = torch.randn(6, 6, generator=_g, dtype=DT)
A = _Q @ _Q.T / 6 + torch.eye(6, dtype=DT)
B = torch.randn(6, generator=_g, dtype=DT)
X0 = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, -1.0], dtype=DT) * 0.5


def f_of(x): return 0.5 * x @ A @ x - B @ x + 0.25 * x.pow(4).sum()
def grad_of(x): return A @ x - B + x ** 3
def split(x): return [x[:4].reshape(2, 2).clone().requires_grad_(), x[4:].clone().requires_grad_()]
def flat(ps): return torch.cat([p.detach().reshape(-1) for p in ps])


def run(lib, name, kwargs, steps=20, lr=1e-3):
    "Trajectory of [estimator, LR(lr)] from X0 and every `backward` flag the closure received"
    ps = split(X0)
    ns = m if lib == 'ours' else tz.m
    modules = [getattr(ns, name)(**kwargs), ns.LR(lr)]
    opt = Modular(ps, *modules) if lib == 'ours' else tz.Optimizer(ps, *modules)
    calls = []
    def closure(backward=True):
        calls.append(backward)
        loss = f_of(torch.cat([p.reshape(-1) for p in ps]))
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    torch.manual_seed(1)
    traj = []
    for _ in range(steps):
        opt.step(closure)
        traj.append(flat(ps))
    return torch.stack(traj), calls


CASES = [
    ('RandomizedFDM', {}), ('RandomizedFDM', dict(distribution='gaussian', n_samples=3, formula='forward')),
    ('RandomizedFDM', dict(distribution='sphere', n_samples=2, formula='backward2')),
    ('RandomizedFDM', dict(distribution='uniform', seed=3)), ('RandomizedFDM', dict(pre_generate=False, n_samples=2)),
    ('RandomizedFDM', dict(target='update')), ('RandomizedFDM', dict(target='grad', distribution='normal')),
    ('RDSA', {}), ('RDSA', dict(h=1e-2, n_samples=4, seed=7)),
    ('GaussianSmoothing', {}), ('GaussianSmoothing', dict(n_samples=5, formula='central')),
    ('MeZO', {}), ('MeZO', dict(distribution='gaussian', n_samples=2)), ('MeZO', dict(formula='forward', target='update')),
    ('ForwardGradient', {}), ('ForwardGradient', dict(n_samples=3, jvp_method='central')),
    ('ForwardGradient', dict(jvp_method='forward', pre_generate=False)), ('ForwardGradient', dict(distribution='rademacher', seed=5)),
]

@pytest.mark.parametrize('name, kwargs', CASES)
def test_against_torchzero(name, kwargs):
    # same draws: the only differences are the order of float operations (x + h·u against torchzero's x + (h·u),
    # exact restore against adding back), divided by 2h ~ 1e-3: about 1e-13 measured, 1e-9 allowed
    ours, calls = run('ours', name, kwargs)
    ref, ref_calls = run('tz', name, kwargs)
    assert (ours[-1] - ours[0]).abs().max() > 1e-3          # the trajectory moves
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    assert not any(calls)                                     # never closure(backward=True)
    assert len(calls) == len(ref_calls)                       # the same number of evaluations


class Draws:
    "Repeated estimates at X0 from one chain [estimator] (its step counter advances, so MeZO draws anew): x ← x − ĝ"
    def __init__(self, estimator):
        self.ps = split(X0)
        self.opt, self.calls = Modular(self.ps, estimator), []
    def closure(self, backward=True):
        self.calls.append(backward)
        loss = f_of(torch.cat([p.reshape(-1) for p in self.ps]))
        if backward:
            self.opt.zero_grad(); loss.backward()
        return loss
    def __call__(self, k: int = 1) -> torch.Tensor:
        out = []
        for _ in range(k):
            with torch.no_grad():
                for p, x in zip(self.ps, split(X0)): p.copy_(x)
            self.opt.step(self.closure)
            out.append(X0 - flat(self.ps))
        assert not any(self.calls)
        return torch.stack(out)

def _single(estimator): return Draws(estimator)()[0]


def _rademacher_draw():
    return torch.cat([torch.bernoulli(torch.full((2, 2), 0.5, dtype=DT)).reshape(-1), torch.bernoulli(torch.full((2,), 0.5, dtype=DT))]) * 2 - 1

def _gaussian_draw():
    return torch.cat([torch.randn(2, 2, dtype=DT).reshape(-1), torch.randn(2, dtype=DT)])

def test_one_sample_against_the_papers():
    h = 1e-3
    state = torch.get_rng_state()
    ours = _single(m.RandomizedFDM(h=h))
    torch.set_rng_state(state)
    delta = _rademacher_draw()                                  # Spall 1992: divide by each Δ_i
    torch.testing.assert_close(ours, (f_of(X0 + h * delta) - f_of(X0 - h * delta)) / (2 * h * delta), atol=1e-9, rtol=0)

    state = torch.get_rng_state()
    ours = _single(m.RDSA(h=h))
    torch.set_rng_state(state)
    d = _gaussian_draw()
    torch.testing.assert_close(ours, (f_of(X0 + h * d) - f_of(X0 - h * d)) / (2 * h) * d, atol=1e-9, rtol=0)

    state = torch.get_rng_state()
    ours = _single(m.GaussianSmoothing(n_samples=1, h=0.05))  # Nesterov–Spokoiny g_μ
    torch.set_rng_state(state)
    u = _gaussian_draw()
    torch.testing.assert_close(ours, (f_of(X0 + 0.05 * u) - f_of(X0)) / 0.05 * u, atol=1e-9, rtol=0)

    state = torch.get_rng_state()
    ours = _single(m.ForwardGradient())                        # Baydin et al.: (∇f·v) v
    torch.set_rng_state(state)
    v = _gaussian_draw()
    torch.testing.assert_close(ours, (grad_of(X0) @ v) * v, atol=1e-12, rtol=0)


def test_mezo_is_malladi_algorithm_1():
    "Three steps of MeZO(distribution='gaussian') against the paper's in-place perturbation, z regenerated from its seed"
    eps, ps = 1e-3, split(X0)
    opt = Modular(ps, m.MeZO(h=eps, distribution='gaussian'), m.LR(0.01))
    def closure(backward=True):
        assert not backward
        return f_of(torch.cat([p.reshape(-1) for p in ps]))
    theta = X0.clone()
    for step in range(3):
        opt.step(closure)
        gen = torch.Generator().manual_seed(1_000_000 * step)
        z = torch.cat([torch.randn(2, 2, generator=gen, dtype=DT).reshape(-1), torch.randn(2, generator=gen, dtype=DT)])
        g = (f_of(theta + eps * z) - f_of(theta - eps * z)) / (2 * eps) * z
        theta = theta - 0.01 * g
        torch.testing.assert_close(flat(ps), theta, atol=1e-9, rtol=0)


@pytest.mark.parametrize('name, kwargs, kappa', [('RandomizedFDM', dict(h=0.5), 1), ('RDSA', dict(h=0.5), 3),
                                                 ('MeZO', dict(h=0.5, distribution='gaussian'), 3)])
def test_bias_is_kappa_h2_x(name, kwargs, kappa):
    """Central differences on ½xᵀAx − bᵀx + ¼Σx⁴ have E[ĝ] = ∇f + κh²x exactly. The mean of 800 estimates at a fixed torch
    state: its squared distance to that prediction over tr Var/800 is about χ²₆/6, below 3.5 with probability > 0.998;
    the distance to ∇f itself (the bias κh²‖x‖ ≥ 0.47) is larger."""
    torch.manual_seed(0)
    est = getattr(m, name)(n_samples=800, target='update', **kwargs)
    ps = split(X0)
    opt = Modular(ps, est)
    closure = lambda backward=True: f_of(torch.cat([p.reshape(-1) for p in ps]))
    opt.step(closure)
    mean = X0 - flat(ps)
    expected = grad_of(X0) + kappa * 0.25 * X0
    # the variance of one sample, from a second batch of single estimates
    single = Draws(getattr(m, name)(**kwargs))(300)
    ratio = float((mean - expected).pow(2).sum() / (single.var(0).sum() / 800))
    assert ratio < 3.5, ratio
    assert torch.linalg.vector_norm(mean - grad_of(X0)) > torch.linalg.vector_norm(mean - expected)


@pytest.mark.parametrize('make, kappa', [(lambda: m.ForwardGradient(), 3), (lambda: m.RandomizedFDM(), 1),
                                         (lambda: m.RandomizedFDM(distribution='uniform'), 9 / 5)])
def test_variance_formula(make, kappa):
    "E‖ĝ − ∇f‖² = (n + κ − 2)‖∇f‖² for one sample: 800 draws, relative standard error ~7%, 25% allowed"
    torch.manual_seed(2)
    g = grad_of(X0)
    G = Draws(make())(800)
    measured, formula = float((G - g).pow(2).sum(1).mean()), (6 + kappa - 2) * float(g @ g)
    assert abs(measured / formula - 1) < 0.25, (measured, formula)


def test_signatures_match_torchzero():
    for name in NAMES:
        ours = [(p.name, p.default) for p in inspect.signature(getattr(m, name)).parameters.values()]
        ref = [(p.name, p.default) for p in inspect.signature(getattr(tz.m, name)).parameters.values()]
        assert ours == ref, name


@pytest.mark.parametrize('name, kwargs, text', [
    ('RandomizedFDM', dict(h=0), 'RandomizedFDM: h=0'), ('RDSA', dict(n_samples=0), 'RDSA: n_samples=0'),
    ('GaussianSmoothing', dict(formula='central4'), "GaussianSmoothing: formula='central4'"),
    ('MeZO', dict(distribution='cauchy'), "MeZO: distribution='cauchy'"),
    ('ForwardGradient', dict(jvp_method='reverse'), "ForwardGradient: jvp_method='reverse'"),
    ('RandomizedFDM', dict(seed='a'), "RandomizedFDM: seed='a'"), ('RDSA', dict(target='loss'), "RDSA: target='loss'"),
    ('MeZO', dict(return_approx_loss=True), 'MeZO: return_approx_loss=True'),
    ('NewtonCG', dict(hvp_method='fd_central'), "NewtonCG: hvp_method='fd_central'")])
def test_bad_arguments(name, kwargs, text):
    with pytest.raises(ValueError, match='^' + text.replace('(', r'\(')) as e: getattr(m, name)(**kwargs)
    assert 'range' in str(e.value) or 'supported' in str(e.value)


def _newton_cg(lib, method, steps=15):
    p = torch.tensor([-1.5, 2.0], dtype=DT, requires_grad=True)
    ns = m if lib == 'ours' else tz.m
    mods = [ns.NewtonCG(hvp_method=method, tol=1e-8, npc_terminate=False), ns.Backtracking()]
    opt = Modular([p], *mods) if lib == 'ours' else tz.Optimizer([p], *mods)
    def closure(backward=True):
        loss = rosenbrock(p[0], p[1])
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    traj = []
    for _ in range(steps):
        opt.step(closure)
        traj.append(p.detach().clone())
    return torch.stack(traj)

def test_newton_cg_fd_forward():
    "Against torchzero's fd_forward along 15 Rosenbrock steps (measured 6e-13), and the first step near the autograd one's"
    ours, ref = _newton_cg('ours', 'fd_forward'), _newton_cg('tz', 'fd_forward')
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    exact = _newton_cg('ours', 'autograd')
    assert (ours[0] - exact[0]).abs().max() < 0.01              # the first step: O(h) errors in its products (measured 3e-3)


def test_fd_forward_hvp_on_a_quadratic():
    "A forward difference of gradients is exact on a quadratic: H v to rounding, parameters restored bit for bit"
    from optim_lab.modular.second_order import fd_forward_hvp
    ps = split(X0)
    def closure(backward=True):
        x = torch.cat([p.reshape(-1) for p in ps])
        loss = 0.5 * x @ A @ x - B @ x
        if backward:
            for p in ps: p.grad = None
            loss.backward()
        return loss
    closure(True)
    v = torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=DT)
    with torch.no_grad(): hv = fd_forward_hvp(closure, ps, flat([p.grad for p in ps]), v, 1e-3)
    torch.testing.assert_close(hv, A @ v, atol=1e-8, rtol=0)
    assert torch.equal(flat(ps), X0)


def test_readme_zeroth_order_newton_cg():
    "torchzero's README chain: GaussianSmoothing, NewtonCG(hvp_method='forward') (its spelling of 'fd_forward'), a line search"
    p = torch.tensor([-1.5, 2.0], dtype=DT, requires_grad=True)
    opt = Modular([p], m.GaussianSmoothing(h=0.01, n_samples=10), m.NewtonCG(hvp_method='forward'), m.Backtracking())
    calls = []
    def closure(backward=True):
        calls.append(backward)
        loss = rosenbrock(p[0], p[1])
        if backward:
            opt.zero_grad(); loss.backward()
        return loss
    torch.manual_seed(0)
    for _ in range(30): opt.step(closure)
    # From 12.5. With NewtonCG's torchzero defaults (tol=1e-8, npc_terminate=False) this run ends at 1.57, and so does
    # torchzero 0.4.4's from the same torch.manual_seed(0) (over seeds 0-9 both spread from 0.01 to 6): 3.0 is about
    # twice the value reached and a quarter of the start
    assert float(rosenbrock(*p.detach())) < 3.0 and not any(calls)


@pytest.mark.parametrize('make', [lambda: m.RandomizedFDM(seed=0), lambda: m.RDSA(seed=1, n_samples=2), lambda: m.MeZO(),
                                  lambda: m.ForwardGradient(seed=2)])
def test_state_dict_resumes_the_random_sequence(make):
    "A seeded generator's state (global_state) and MeZO's step counter round-trip: 3 + 3 steps equal 6 steps exactly"
    def chain(ps): return Modular(ps, make(), m.LR(1e-2))
    def closure_for(ps):
        return lambda backward=True: f_of(torch.cat([p.reshape(-1) for p in ps]))
    ps = split(X0)
    opt = chain(ps)
    for _ in range(6): opt.step(closure_for(ps))
    straight = flat(ps)
    ps = split(X0)
    opt = chain(ps)
    for _ in range(3): opt.step(closure_for(ps))
    sd, now = opt.state_dict(), [p.detach().clone() for p in ps]
    ps2 = [x.clone().requires_grad_() for x in now]
    opt2 = chain(ps2)
    opt2.load_state_dict(sd)
    for _ in range(3): opt2.step(closure_for(ps2))
    assert torch.equal(flat(ps2), straight)


# ---------------------------------------------------------------- FSDP2-style sharded parameters: 2 gloo ranks, DTensors sharded on dim 0
DIST_SPECS = {'RandomizedFDM': lambda: m.RandomizedFDM(seed=0), 'RandomizedFDM(uniform, forward)': lambda: m.RandomizedFDM(formula='forward', distribution='uniform', seed=1),
              'RandomizedFDM(sphere, 3 samples)': lambda: m.RandomizedFDM(n_samples=3, distribution='sphere', seed=2),
              'RDSA': lambda: m.RDSA(seed=0), 'GaussianSmoothing': lambda: m.GaussianSmoothing(n_samples=5, seed=0),
              'MeZO': lambda: m.MeZO(), 'MeZO(gaussian)': lambda: m.MeZO(distribution='gaussian'),
              'ForwardGradient(central)': lambda: m.ForwardGradient(jvp_method='central', seed=0)}
DIST_SHAPES = ((5,), (3, 4), (1, 6))   # 5 rows on 2 ranks: 3 + 2 (uneven); one row: rank 1 holds none


def dist_run(make, shard=None):
    "6 steps of the estimator then LR(0.01), on the whole tensors' loss (`chain_run`)"
    return chain_run([make(), m.LR(0.01)], lambda w: ((w - 0.5) ** 2).sum() + (w ** 4).sum() + w.sum() ** 2, DIST_SHAPES, 6, shard, DT)


def _worker(mesh, out_dir):
    return {**{name: dist_run(make, shard_rows(mesh)) for name, make in DIST_SPECS.items()}, 'jvp refusal': _jvp_refusal(mesh)}


def _jvp_refusal(mesh):
    try: dist_run(lambda: m.ForwardGradient(seed=0), shard_rows(mesh))
    except NotImplementedError as e: return str(e)
    return 'no error'


@pytest.fixture(scope='module')
def sharded_results(tmp_path_factory):
    return rank_results(__file__, tmp_path_factory.mktemp('ranks'))   # both ranks'


@pytest.mark.parametrize('name', list(DIST_SPECS))
def test_sharded_draws_are_one_process_draws(name, sharded_results):
    """Each direction is drawn on the whole shape and sharded (random_direction), so on 2 ranks with uneven shards both
    ranks end where one process ends (per-shard draws ended 1.4 apart after 6 steps). Measured: 0 apart; 1e-12 leaves
    room for rounding, far below the 6 steps' movement (asserted > 0.01)"""
    ref = [torch.tensor(x, dtype=DT) for x in dist_run(DIST_SPECS[name])]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g, dtype=DT) for s in DIST_SHAPES]
    assert max((a - b).abs().max().item() for a, b in zip(ref, start)) > 0.01   # the run moved
    for rank in sharded_results:
        ours = [torch.tensor(x, dtype=DT) for x in rank[name]]
        assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= 1e-12


def test_forward_mode_refuses_shards(sharded_results):
    "torch.func.jvp does not run on DTensors: ForwardGradient(jvp_method='autograd') says so and names the alternatives"
    assert sharded_results[0]['jvp refusal'].startswith("ForwardGradient: jvp_method='autograd' (torch.func.jvp) does not run")



if WORKER: serve_rank(_worker)
