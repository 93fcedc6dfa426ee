"""The conjugate-gradient modules of `optim_lab.modular.m` (nbs/68_conjugate_gradient.ipynb): each β against a float64
transcription of its formula, exact-step CG against linear CG, torchzero 0.4.4's signatures, and agreement with
torchzero 0.4.4 along whole trajectories wherever torchzero computes the formula (it keeps a stale previous gradient
otherwise, which the last tests pin down)."""
import copy
import inspect

import pytest
import torch

from optim_lab.modular import Modular, m
from optim_lab.problems import rosenbrock
from distributed_harness import is_rank, rank_results, serve_rank, shard_rows
from peer_versions import peer_is

WORKER = is_rank(__name__)   # a rank of the sharded test at the end
if not WORKER:
    tz = pytest.importorskip('torchzero')

DT = torch.float64
BETAS = ['PolakRibiere', 'FletcherReeves', 'HestenesStiefel', 'DaiYuan', 'LiuStorey', 'ConjugateDescent', 'HagerZhang', 'DYHS']
ALL = BETAS + ['ProjectedGradientMethod']

# ---------------------------------------------------------------- problems (float64)
_g = torch.Generator().manual_seed(0)
_Q = torch.randn(6, 6, generator=_g, dtype=DT)
A6 = _Q @ _Q.T / 6 + 0.5 * torch.eye(6, dtype=DT)
B6 = torch.randn(6, generator=_g, dtype=DT)
X0 = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, -1.0], dtype=DT)


def quartic(x): return 0.5 * x @ A6 @ x - B6 @ x + 0.1 * (x ** 4).sum()
def quartic_grad(x): return A6 @ x - B6 + 0.4 * x ** 3


def logsumexp_fn(x):
    "A smooth strongly convex non-quadratic: log Σ exp(Cx) + ½‖x‖²"
    return torch.logsumexp(_C @ x, 0) + 0.5 * x @ x
_C = torch.randn(9, 6, generator=_g, dtype=DT)
def logsumexp_grad(x):
    return _C.T @ torch.softmax(_C @ x, 0) + x


def path(make_opt, loss_fn, steps, x0=X0):
    "Iterates of an optimizer (ours or torchzero's) on loss_fn, x spread over a 2x2 matrix and a 2-vector"
    ps = [x0[:4].reshape(2, 2).clone().requires_grad_(), x0[4:].clone().requires_grad_()]
    opt = make_opt(ps)
    def closure(backward=True):
        loss = loss_fn(torch.cat([p.reshape(-1) for p in ps]))
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append(torch.cat([p.detach().reshape(-1) for p in ps]))
    return torch.stack(out)


# ---------------------------------------------------------------- the formulas, written independently
def beta_formula(name, g, g_, p):
    "Hager & Zhang 2006, table 1, with p the previous (descent) direction and y = g - g_"
    y = g - g_
    hs, dy = (g @ y) / (p @ y), (g @ g) / (p @ y)
    return {'FletcherReeves': (g @ g) / (g_ @ g_), 'PolakRibiere': (g @ y) / (g_ @ g_), 'HestenesStiefel': hs,
            'DaiYuan': dy, 'LiuStorey': -(g @ y) / (p @ g_), 'ConjugateDescent': -(g @ g) / (p @ g_),
            'HagerZhang': (y - 2 * p * (y @ y) / (p @ y)) @ g / (p @ y),
            'DYHS': max(0.0, min(float(hs), float(dy)))}[name]


def textbook(name, grad_fn, steps, lr, restart, clip, x0=X0, frozen=False):
    "p = -g + β p_ (steepest descent every `restart` steps), x += lr·p; `frozen`: g_ stays the cycle's first gradient"
    x, out = x0.clone(), []
    for k in range(steps):
        g = grad_fn(x)
        if k == 0 or (restart is not None and k % restart == 0):
            p, g_ = -g, g
        else:
            beta = float(beta_formula(name, g, g_, p))
            p = -g + (max(beta, 0.0) if clip else beta) * p
            if not frozen: g_ = g
        x = x + lr * p
        out.append(x)
    return torch.stack(out)


def pearson(grad_fn, steps, lr, restart, x0=X0):
    "Pearson's algorithm 5: H ← H − Hy yᵀH / yᵀHy from H = I, u = H g; H = I again at steps k with (k + 1) % restart == 0"
    x, out, n = x0.clone(), [], x0.numel()
    H, g_prev = torch.eye(n, dtype=DT), None
    for k in range(steps):
        g = grad_fn(x)
        if g_prev is not None:
            if (k + 1) % restart == 0: H = torch.eye(n, dtype=DT)
            else:
                y = g - g_prev
                H = H - torch.outer(H @ y, H @ y) / (y @ H @ y)
        g_prev = g
        x = x - lr * (H @ g)
        out.append(x)
    return torch.stack(out)


# ---------------------------------------------------------------- each β against its formula
@pytest.mark.parametrize('name', BETAS)
@pytest.mark.parametrize('problem', ['quartic', 'logsumexp'])
def test_beta_against_formula(name, problem):
    loss_fn, grad_fn = (quartic, quartic_grad) if problem == 'quartic' else (logsumexp_fn, logsumexp_grad)
    for restart, clip in ((4, False), (10, True), (10, False)):
        ours = path(lambda ps: Modular(ps, getattr(m, name)(restart_interval=restart, clip_beta=clip), m.LR(0.05)), loss_fn, 50)
        ref = textbook(name, grad_fn, 50, 0.05, restart, clip)
        assert ours.abs().max() < 20          # a bounded run
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


def test_projected_gradient_against_pearson():
    for restart in ('auto', 4):     # without restarts H reaches 0 after n = 6 steps and the run stops
        ours = path(lambda ps: Modular(ps, m.ProjectedGradientMethod(restart_interval=restart), m.LR(0.05)), quartic, 40)
        torch.testing.assert_close(ours, pearson(quartic_grad, 40, 0.05, 7 if restart == 'auto' else restart), rtol=0, atol=1e-9)


def test_auto_restart_is_n_plus_one():
    "restart_interval='auto': steepest descent every n + 1 = 7 steps"
    ours = path(lambda ps: Modular(ps, m.HestenesStiefel(), m.LR(0.05)), quartic, 30)
    torch.testing.assert_close(ours, textbook('HestenesStiefel', quartic_grad, 30, 0.05, 7, False), rtol=0, atol=1e-9)


# ---------------------------------------------------------------- exact line search: linear CG
class _Exact(m.StrongWolfe.__mro__[1]):   # chapter 62's LineSearch base
    def __init__(self, A): super().__init__({}); self.A = A
    def search(self, var, ls):
        u = torch.cat([d.reshape(-1) for d in ls.d]); g = torch.cat([d.reshape(-1) for d in var.get_grad()])
        return float(g @ u / (u @ self.A @ u))


def _linear_cg(A, b, steps):
    "N&W Alg. 5.2 from x = 0: the iterates"
    x, r = torch.zeros_like(b), -b.clone()
    p, out = -r, []
    for _ in range(steps):
        alpha = (r @ r) / (p @ A @ p)
        x = x + alpha * p
        r_new = r + alpha * (A @ p)
        p = -r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize('seed', [0, 1])
def test_exact_step_is_linear_cg(seed):
    gen = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=DT))
    A = V @ torch.diag(torch.logspace(0, 2, 8, dtype=DT)) @ V.T
    b = torch.randn(8, generator=gen, dtype=DT)
    ref = _linear_cg(A, b, 8)
    for name in ALL:
        x = torch.zeros(8, dtype=DT, requires_grad=True)
        opt = Modular([x], getattr(m, name)(), _Exact(A))
        def closure(backward=True):
            loss = 0.5 * x @ A @ x - b @ x
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss
        xs = []
        for _ in range(8):
            opt.step(closure)
            xs.append(x.detach().clone())
        torch.testing.assert_close(torch.stack(xs), ref, rtol=0, atol=1e-8, msg=name)
        assert torch.linalg.vector_norm(A @ xs[-1] - b) < 1e-7 * b.norm(), name


# ---------------------------------------------------------------- torchzero 0.4.4
@pytest.mark.parametrize('name', ALL)
def test_signature_is_torchzeros(name):
    ours, theirs = inspect.signature(getattr(m, name)), inspect.signature(getattr(tz.m, name))
    assert [(p.name, p.default) for p in ours.parameters.values()] == [(p.name, p.default) for p in theirs.parameters.values()]


@pytest.mark.parametrize('name', BETAS)
@pytest.mark.parametrize('clip', [False, True])
def test_against_torchzero_two_step_cycles(name, clip):
    "With restart_interval=2 every β of torchzero 0.4.4 uses the right previous gradient: whole trajectories agree"
    for loss_fn in (quartic, logsumexp_fn):
        ours = path(lambda ps: Modular(ps, getattr(m, name)(restart_interval=2, clip_beta=clip), m.LR(0.05)), loss_fn, 40)
        theirs = path(lambda ps: tz.Optimizer(ps, getattr(tz.m, name)(restart_interval=2, clip_beta=clip), tz.m.LR(0.05)), loss_fn, 40)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize('kwargs', [{}, dict(restart_interval=12), dict(restart_interval=5, clip_beta=True)])  # no restarts: FR blows up at a fixed step
def test_fletcher_reeves_against_torchzero(kwargs):
    for loss_fn in (quartic, logsumexp_fn):
        ours = path(lambda ps: Modular(ps, m.FletcherReeves(**kwargs), m.LR(0.02)), loss_fn, 40)
        theirs = path(lambda ps: tz.Optimizer(ps, tz.m.FletcherReeves(**kwargs), tz.m.LR(0.02)), loss_fn, 40)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize('kwargs', [{}, dict(restart_interval=None), dict(init_scale=2.0, restart_interval=4)])
def test_projected_gradient_against_torchzero(kwargs):
    for loss_fn in (quartic, logsumexp_fn):
        ours = path(lambda ps: Modular(ps, m.ProjectedGradientMethod(**kwargs), m.LR(0.05)), loss_fn, 40)
        theirs = path(lambda ps: tz.Optimizer(ps, tz.m.ProjectedGradientMethod(**kwargs), tz.m.LR(0.05)), loss_fn, 40)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize('name', ['PolakRibiere', 'DaiYuan', 'LiuStorey', 'ConjugateDescent'])
def test_torchzero_keeps_a_stale_previous_gradient(name):
    "torchzero 0.4.4 is the frozen-g_ recurrence, so it departs from the formula (which the modules follow) at step 3"
    ours = path(lambda ps: Modular(ps, getattr(m, name)(restart_interval=None, clip_beta=False), m.LR(0.05)), quartic, 12)
    torch.testing.assert_close(ours, textbook(name, quartic_grad, 12, 0.05, None, False), rtol=1e-9, atol=1e-9)
    theirs = path(lambda ps: tz.Optimizer(ps, getattr(tz.m, name)(restart_interval=None, clip_beta=False), tz.m.LR(0.05)), quartic, 12)
    torch.testing.assert_close(ours[:2], theirs[:2], rtol=0, atol=1e-12)
    if peer_is('torchzero'):
        torch.testing.assert_close(theirs, textbook(name, quartic_grad, 12, 0.05, None, False, frozen=True), rtol=1e-9, atol=1e-9)
        assert (ours - theirs).abs().max() > 1e-4


# ---------------------------------------------------------------- the module contract
@pytest.mark.parametrize('name', BETAS)
def test_bad_arguments(name):
    cls = getattr(m, name)
    with pytest.raises(ValueError, match=f"{name}: restart_interval=0 is outside the allowed range"):
        cls(restart_interval=0)
    with pytest.raises(ValueError, match=f"{name}: restart_interval=2.5 is outside"):
        cls(restart_interval=2.5)
    with pytest.raises(ValueError, match=f"{name}: clip_beta='yes' is outside the allowed range"):
        cls(clip_beta='yes')
    with pytest.raises(NotImplementedError, match='inner'):
        cls(inner=m.LR(1.0))


def test_bad_group_override():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="PolakRibiere: restart_interval=0 is outside the allowed range"):
        Modular([{'params': [x], 'restart_interval': 0}], m.PolakRibiere(), m.LR(0.1))
    opt = Modular([x], m.DaiYuan(), m.LR(0.1))
    with pytest.raises(ValueError, match="DaiYuan: clip_beta=2 is outside"):
        opt.param_groups[0]['clip_beta'] = 2


def test_bad_arguments_projected_gradient():
    with pytest.raises(ValueError, match='ProjectedGradientMethod: init_scale=-1'):
        m.ProjectedGradientMethod(init_scale=-1)
    with pytest.raises(ValueError, match='ProjectedGradientMethod: update_freq=0'):
        m.ProjectedGradientMethod(update_freq=0)


def test_alias_and_namespace():
    assert m.HybridHS_DY is m.DYHS
    for name in ALL: assert hasattr(m, name)


@pytest.mark.parametrize('name', ALL)
def test_rosenbrock_with_strong_wolfe_and_resume(name):
    "Converges on Rosenbrock with the strong Wolfe search; state_dict after 5 steps resumes bit for bit"
    def run(opt, p, steps):
        def closure(backward=True):
            loss = rosenbrock(p[0], p[1])
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss
        for _ in range(steps): opt.step(closure)
    make = lambda: [getattr(m, name)(), m.StrongWolfe(c2=0.1, a_init='first-order')]
    p = torch.tensor([-1.5, 2.0], dtype=DT, requires_grad=True)
    opt = Modular([p], *make())
    run(opt, p, 5)
    saved, q = copy.deepcopy(opt.state_dict()), p.detach().clone().requires_grad_(True)
    opt2 = Modular([q], *make())
    opt2.load_state_dict(saved)
    run(opt, p, 5); run(opt2, q, 5)
    assert torch.equal(p, q)
    run(opt, p, 70)
    assert float(rosenbrock(p[0], p[1]).detach()) < 1e-6, name


# ---------------------------------------------------------------- FSDP2-style sharded parameters (2 gloo ranks)
SHARD_SHAPES = ((5,), (3, 4), (1, 6))   # 5 rows on 2 ranks: 3 + 2; one row: rank 1 holds none


def sharded_run(name, shard=None):
    "10 steps of [module, LR] without a closure; `shard(t)` makes each parameter a DTensor (None: one process)"
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=g, dtype=DT) for s in SHARD_SHAPES]
    ps = [torch.nn.Parameter(shard(t) if shard else t.clone()) for t in full]
    opt = Modular(ps, getattr(m, name)(restart_interval=6), m.LR(0.02))
    for _ in range(10):
        whole = [(p.full_tensor() if shard else p.detach()).clone().requires_grad_() for p in ps]
        loss = sum(((w - 0.3) ** 2 * (i + 1)).sum() + 0.1 * (w ** 4).sum() for i, w in enumerate(whole))
        grads = torch.autograd.grad(loss, whole)
        for p, gr in zip(ps, grads): p.grad = shard(gr) if shard else gr   # what FSDP2's reduce-scatter leaves
        opt.step()
    return [(p.full_tensor() if shard else p.detach()).tolist() for p in ps]


def _worker(mesh, out_dir):
    return {name: sharded_run(name, shard_rows(mesh)) for name in BETAS}


@pytest.fixture(scope='module')
def sharded_results(tmp_path_factory):
    return rank_results(__file__, tmp_path_factory.mktemp('ranks'))[0]   # rank 0's


@pytest.mark.parametrize('name', BETAS)
def test_sharded_parameters_end_where_one_process_ends(name, sharded_results):
    "Every inner product is a reduction on the DTensor itself: 2 ranks end where one process ends, to rounding"
    ours = [torch.tensor(x, dtype=DT) for x in sharded_results[name]]
    ref = [torch.tensor(x, dtype=DT) for x in sharded_run(name)]
    assert max((a - b).abs().max().item() for a, b in zip(ours, ref)) <= 1e-12


if WORKER: serve_rank(_worker)
