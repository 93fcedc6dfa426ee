"GaLore and APOLLO (chapter 80): float64 transcriptions of the papers' algorithms, pytorch-optimizer 4.1 where it agrees, and the contract"
from __future__ import annotations
import math

import pytest
import torch
import pytorch_optimizer

from optim_lab.optimizers.galore_apollo import GaLore, APOLLO
from optim_lab.optimizers.adam import AdamW
from distributed_harness import is_rank, rank_results, serve_rank, shard_rows


def sides_of(shape, projection_type):
    m, n = shape
    if projection_type in ('std', 'random'): return {'right'} if m >= n else {'left'}
    if projection_type == 'reverse_std': return {'left'} if m >= n else {'right'}
    return {'left', 'right'} if projection_type == 'full' else {projection_type}


def galore_steps(theta, grads, lr, rank, gap, scale=1.0, projection_type='std', betas=(0.9, 0.999), eps=1e-6, wd=0.0):
    "GaLore's Algorithm 1 (authors' bias correction, decay after the step), float64, every projection side"
    b1, b2 = betas
    sides = sides_of(theta.shape, projection_type)
    M = V = L = R = None
    for t, G in enumerate(grads, 1):
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            L = U[:, :rank] if 'left' in sides else None
            R = Vh[:rank] if 'right' in sides else None
        X = G if L is None else L.T @ G
        X = X if R is None else X @ R.T
        if M is None: M, V = torch.zeros_like(X), torch.zeros_like(X)
        M = b1 * M + (1 - b1) * X
        V = b2 * V + (1 - b2) * X * X
        N = M / (V.sqrt() + eps)
        N = N if L is None else L @ N
        N = N if R is None else N @ R
        theta = (theta - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * scale * N) * (1 - lr * wd)
    return theta


def apollo_steps(theta, grads, lr, rank, gap, scale_type='tensor', scale=1.0, projection_type='std', seed=0,
                 betas=(0.9, 0.999), eps=1e-6):
    "APOLLO's Algorithm 1 with the norm-growth limiter, float64; the bases drawn as the chapter says (seed + 1, then chained)"
    b1, b2 = betas
    (side,) = sides_of(theta.shape, projection_type)
    m, n = theta.shape
    M = V = Q = last = None
    next_seed = seed + 1
    for t, G in enumerate(grads, 1):
        if (t - 1) % gap == 0:
            gen = torch.Generator().manual_seed(next_seed)
            Q = torch.randn((rank, n) if side == 'right' else (m, rank), generator=gen, dtype=torch.float64) / math.sqrt(rank)
            next_seed = int(torch.randint(2 ** 62, (), generator=gen))
        X = G @ Q.T if side == 'right' else Q.T @ G
        if M is None: M, V = torch.zeros_like(X), torch.zeros_like(X)
        M = b1 * M + (1 - b1) * X
        V = b2 * V + (1 - b2) * X * X
        N = M / (V.sqrt() + eps)
        if scale_type == 'tensor': S = N.norm() / (X.norm() + 1e-8)
        elif side == 'right': S = (N.norm(dim=1) / (X.norm(dim=1) + 1e-8))[:, None]
        else: S = (N.norm(dim=0) / (X.norm(dim=0) + 1e-8))[None, :]
        D = G * S
        if last is not None: D = D / (max(D.norm() / (last + 1e-8), 1.01) / 1.01)
        last = D.norm()
        theta = theta - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * math.sqrt(scale) * D
    return theta


def grads_for(shape, steps, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]


def run(opt_fn, theta0, grads):
    p = theta0.clone().requires_grad_()
    opt = opt_fn([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize('shape', [(10, 6), (5, 9)])
@pytest.mark.parametrize('projection_type', ['std', 'reverse_std', 'left', 'right', 'full'])
def test_galore_matches_algorithm(shape, projection_type):
    theta0, grads = grads_for(shape, 45)
    hypers = dict(lr=1e-2, rank=3, update_proj_gap=8, scale=0.5, projection_type=projection_type)
    ours = run(lambda ps: GaLore(ps, weight_decay=0.1, **hypers), theta0, grads)
    ref = galore_steps(theta0, grads, 1e-2, 3, 8, 0.5, projection_type, wd=0.1)
    assert (ours - ref).abs().max() < 1e-12


@pytest.mark.parametrize('shape', [(10, 6), (5, 9)])
@pytest.mark.parametrize('scale_type', ['tensor', 'channel'])
@pytest.mark.parametrize('projection_type', ['std', 'reverse_std'])
def test_apollo_matches_algorithm(shape, scale_type, projection_type):
    theta0, grads = grads_for(shape, 45, seed=1)
    ours = run(lambda ps: APOLLO(ps, lr=1e-2, rank=2, update_proj_gap=8, scale_type=scale_type, scale=2.0,
                                 projection_type=projection_type, seed=3), theta0, grads)
    ref = apollo_steps(theta0, grads, 1e-2, 2, 8, scale_type, 2.0, projection_type, seed=3)
    assert (ours - ref).abs().max() < 1e-12


def test_galore_matches_peer_with_one_refresh():
    "pytorch-optimizer's GaLore agrees in float32 while its schedule does not differ (one refresh, at step 1)"
    theta0, grads = grads_for((12, 7), 60, dtype=torch.float32)
    group = dict(rank=3, update_proj_gap=1000, scale=0.25, projection_type='std')
    ours = run(lambda ps: GaLore([dict(params=ps, **group)], lr=1e-2, weight_decay=0.1), theta0, grads)
    theirs = run(lambda ps: pytorch_optimizer.GaLore([dict(params=ps, **group)], lr=1e-2, weight_decay=0.1), theta0, grads)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize('cls', [GaLore, APOLLO])
def test_without_rank_is_peer_adamw(cls):
    theta0, grads = grads_for((4, 5), 60, dtype=torch.float32)
    peer = getattr(pytorch_optimizer, cls.__name__)
    ours, theirs = run(lambda ps: cls(ps, lr=1e-2), theta0, grads), run(lambda ps: peer(ps, lr=1e-2), theta0, grads)
    assert (ours - theirs).abs().max() < 1e-5


def test_refresh_schedule_is_the_authors():
    "New bases on steps 1, 1 + T, 1 + 2T (pytorch-optimizer: 1, T, 2T)"
    p = torch.randn(8, 5, requires_grad=True)
    opt = GaLore([dict(params=[p], rank=2, update_proj_gap=4)])
    changed, last = [], None
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 14):
        p.grad = torch.randn(8, 5, generator=gen)
        opt.step()
        basis = opt.state[p]['right']
        if last is None or not torch.equal(basis, last): changed.append(t)
        last = basis.clone()
    assert changed == [1, 5, 9, 13]


@pytest.mark.parametrize('cls', [GaLore, APOLLO])
def test_state_at_rank_8_is_an_eighth_of_adams(cls):
    def state_bytes(make):
        w = torch.randn(256, 256, requires_grad=True); w.grad = torch.randn(256, 256)
        opt = make(w); opt.step()
        return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert state_bytes(lambda w: cls([dict(params=[w], rank=8)])) <= state_bytes(lambda w: AdamW([w])) / 8


@pytest.mark.parametrize('cls', [GaLore, APOLLO])
def test_zero_gradients_leave_weights_bit_identical(cls):
    w, b = torch.randn(9, 6, requires_grad=True), torch.randn(6, requires_grad=True)
    before = w.detach().clone(), b.detach().clone()
    opt = cls([dict(params=[w], rank=2, update_proj_gap=2), dict(params=[b])], weight_decay=0.0)
    for _ in range(5):
        w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
        opt.step()
    assert torch.equal(w.detach(), before[0]) and torch.equal(b.detach(), before[1])


@pytest.mark.parametrize('cls', [GaLore, APOLLO])
@pytest.mark.parametrize('split', [3, 4, 7])
def test_resume_across_refreshes(cls, split):
    "Saved before, on and after a refresh step (T = 3): the resumed run is the uninterrupted one, bit for bit"
    theta0, grads = grads_for((9, 6), 14, seed=2, dtype=torch.float32)
    def go(split_at):
        p = theta0.clone().requires_grad_()
        make = lambda: cls([dict(params=[p], rank=2, update_proj_gap=3)], lr=1e-2)
        opt = make()
        for t, g in enumerate(grads):
            if t == split_at:
                saved = opt.state_dict(); opt = make(); opt.load_state_dict(saved)
            p.grad = g.clone(); opt.step()
        return p.detach()
    assert torch.equal(go(split), go(None))


def test_apollo_does_not_touch_the_global_generator():
    theta0, grads = grads_for((9, 6), 5, dtype=torch.float32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(lambda ps: APOLLO(ps, rank=2, update_proj_gap=2), theta0, grads)
    assert torch.equal(torch.rand(3), expected)


def test_apollo_scales_the_raw_gradient():
    "With tensor scaling the first step is a multiple of G itself (full rank); pytorch-optimizer's is rank r"
    w = torch.randn(20, 10, requires_grad=True)
    w0 = w.detach().clone(); w.grad = torch.randn(20, 10)
    APOLLO([dict(params=[w], rank=2)], lr=1e-2).step()
    step = w0 - w.detach()
    cos = torch.nn.functional.cosine_similarity(step.flatten(), w.grad.flatten(), dim=0)
    assert cos > 0.99999 and torch.linalg.matrix_rank(step) == 10


@pytest.mark.parametrize('bad, message', [
    (dict(rank=0), 'GaLore: rank=0 is outside'), (dict(rank=2.5), 'GaLore: rank=2.5 is outside'),
    (dict(update_proj_gap=0), 'GaLore: update_proj_gap=0 is outside'),
    (dict(projection_type='diagonal'), "GaLore: projection_type='diagonal' is outside")])
def test_bad_group_keys_rejected(bad, message):
    w = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match=message): GaLore([dict(params=[w], **bad)])
    opt = GaLore([torch.randn(3, requires_grad=True)])
    with pytest.raises(ValueError, match=message): opt.add_param_group(dict(params=[w], **bad))
    assert len(opt.param_groups) == 1


def test_apollo_refuses_full_and_bad_scale_type():
    w = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="APOLLO: projection_type='full'"): APOLLO([w], rank=2, projection_type='full')
    with pytest.raises(ValueError, match="APOLLO: scale_type='row'"): APOLLO([w], scale_type='row')


@pytest.mark.parametrize('cls', [GaLore, APOLLO])
def test_compiled_step_matches_eager(cls):
    theta0, grads = grads_for((9, 6), 12, seed=4, dtype=torch.float32)
    eager = run(lambda ps: cls(ps, lr=1e-2, rank=2, update_proj_gap=5), theta0, grads)
    compiled = run(lambda ps: cls(ps, lr=1e-2, rank=2, update_proj_gap=5, compile=True), theta0, grads)
    assert (eager - compiled).abs().max() < 1e-5


# %% FSDP2: the sharded step is the one-process step (bit-identical full gradients on both sides)

DIST_SHAPES = [(5, 2, 3, 3), (3, 16), (1, 3), (9, 6), (7,)]   # uneven shards; rank 1 holds no row of (1, 3)
DIST_STEPS = 9                                                 # refreshes at steps 1, 5, 9
DIST_OPTS = {'GaLore': lambda ps: GaLore(ps, lr=1e-2, rank=2, update_proj_gap=4, weight_decay=0.1),
             'APOLLO': lambda ps: APOLLO(ps, lr=1e-2, rank=2, update_proj_gap=4, scale_type='channel')}


def _dist_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(torch.Size(s).numel(), generator=gen).reshape(s) for s in DIST_SHAPES]


def _dist_run(name, shard=lambda t: t):
    params = [torch.nn.Parameter(shard(t)) for t in _dist_tensors(0)]
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
        sharded_state = all(isinstance(v, DTensor) and v.placements == p.placements
                            for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.shape == p.shape)
        results[name] = dict(weights=[p.full_tensor() for p in params], sharded_state=sharded_state)
    return results


def test_fsdp2_sharded_step_equals_one_process(tmp_path):
    "The SVD and the random bases see the whole matrix: 2 ranks with Shard(0) parameters take the one-process steps"
    ranks = rank_results(__file__, tmp_path)
    for name in DIST_OPTS:
        one, _ = _dist_run(name)
        assert max((p.detach() - q).abs().max().item() for p, q in zip(one, _dist_tensors(0))) > 1e-2   # it moved
        for r in ranks:
            assert r[name]['sharded_state'], f'{name}: a parameter-shaped state tensor is not sharded like its parameter'
            dev = max((a - b.detach()).abs().max().item() for a, b in zip(r[name]['weights'], one))
            assert dev < 1e-6, f'{name}: 2 ranks vs one process {dev:.2e}'


if is_rank(__name__): serve_rank(_dist_worker)
