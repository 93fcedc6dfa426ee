"""Kron (nbs/77_kron.ipynb) against pytorch-optimizer 4.1's Kron, with the same probes from the same torch seed, and
the parts of its contract the shared tests do not reach: resume with float64 weights and a float32 preconditioner,
zero gradients, the fit counter, the FSDP2 sharded step against one process."""
from __future__ import annotations
import copy, os
os.environ.setdefault('OMP_NUM_THREADS', '1')

import numpy as np
import pytest
import torch
from torch import nn

from optim_lab.optimizers.kron import Kron, kron_factor_kinds
from distributed_harness import is_rank, rank_results, serve_rank, shard_rows

torch.set_num_threads(1)
pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

SHAPES = [(6, 5), (7,), (3, 4, 2), (), (1, 9), (2, 3, 3, 2)]


def trajectory(make, steps=60, dtype=torch.float64, shapes=SHAPES, seed=0):
    "Weights after `steps` steps on a weight-dependent noisy gradient; the probes from torch seed `seed`"
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]
    opt = make(ps)
    torch.manual_seed(seed)
    np.random.seed(0)                       # the peer balances at random from numpy's generator
    for _ in range(steps):
        for p in ps: p.grad = torch.sin(2 * p.detach()) + 0.3 * torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    return [p.detach().clone() for p in ps]


def peer_deviation(shapes=SHAPES, dtype=torch.float64, **hypers):
    ours = trajectory(lambda ps: Kron(ps, precondition_dtype=dtype, **hypers), shapes=shapes, dtype=dtype)
    renamed = {('weight_decouple' if k == 'decoupled_wd' else k): v for k, v in hypers.items()}
    peer = trajectory(lambda ps: pytorch_optimizer.Kron(ps, precondition_dtype=dtype, **renamed), shapes=shapes, dtype=dtype)
    return max((a - b).abs().max().item() for a, b in zip(ours, peer))


def half(steps): return 0.5
def decaying(steps): return max(0.2, 1.0 - 0.05 * steps)


# Margin: the peer runs its float64 triangular solves in float32 (measured deviation 1e-9 to 3e-9 over 60 steps); with
# no triangular factor ('all_diag') both are float64 throughout and agree to 1e-16.
@pytest.mark.parametrize('hypers', [
    dict(), dict(memory_save_mode='one_diag'), dict(memory_save_mode='smart_one_diag'),
    dict(momentum_into_precondition_update=False), dict(max_size_triangular=4), dict(min_ndim_triangular=1),
    dict(min_ndim_triangular=3), dict(pre_conditioner_update_probability=0.3),
    dict(pre_conditioner_update_probability=half), dict(pre_conditioner_update_probability=decaying),
    dict(momentum=0.5, balance_prob=0.25), dict(momentum=0.0), dict(maximize=True)],
    ids=lambda h: ','.join(f'{k}={getattr(v, "__name__", v)}' for k, v in h.items()) or 'defaults')
def test_agrees_with_peer_float64(hypers):
    assert peer_deviation(**hypers) < 1e-7


def test_all_diagonal_agrees_with_peer_to_float64():
    assert peer_deviation(memory_save_mode='all_diag') < 1e-13


@pytest.mark.parametrize('decoupled', [True, False])
def test_weight_decay_agrees_with_peer_on_matrices(decoupled):
    "The peer decays only tensors with two or more dimensions; on those, both agree"
    assert peer_deviation(shapes=[(6, 5), (3, 4, 2)], lr=0.02, weight_decay=0.1, decoupled_wd=decoupled) < 1e-7


def test_precondition_dtype_none_is_the_weights_dtype():
    "None: Q in the weights' dtype (float64 here), as the peer's None"
    ours = trajectory(lambda ps: Kron(ps, precondition_dtype=None))
    peer = trajectory(lambda ps: pytorch_optimizer.Kron(ps, precondition_dtype=None))
    assert max((a - b).abs().max().item() for a, b in zip(ours, peer)) < 1e-7
    p = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    opt = Kron([p], precondition_dtype=None)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]['Q_0'].dtype == torch.float64


def test_agrees_with_peer_float32():
    "float32 everywhere, 60 steps: float32 rounding through the fit (measured 1.2e-7; 100x margin for other kernels)"
    assert peer_deviation(dtype=torch.float32) < 1e-5


def test_default_schedule_after_500_steps_agrees_with_peer():
    "700 steps on small tensors: the schedule leaves p = 1 at step 500 and both skip the same fits (measured 1.6e-9)"
    shapes = [(3, 2), (4,)]
    ours = trajectory(lambda ps: Kron(ps, precondition_dtype=torch.float64), steps=700, shapes=shapes)
    peer = trajectory(lambda ps: pytorch_optimizer.Kron(ps, precondition_dtype=torch.float64), steps=700, shapes=shapes)
    assert max((a - b).abs().max().item() for a, b in zip(ours, peer)) < 1e-6


def test_factor_layout_matches_peer():
    "Which dimensions are triangular: the same as the peer's factors, for every memory_save_mode"
    from pytorch_optimizer.optimizer.psgd import initialize_q_expressions
    for shape in [(6, 5), (5, 6), (4, 4), (7,), (), (1, 9), (3, 5, 5), (5, 3, 5), (9, 8192 + 1)]:
        for mode in (None, 'one_diag', 'smart_one_diag', 'all_diag'):
            for max_size, min_ndim in ((8192, 2), (5, 1), (8192, 3)):
                qs, _ = initialize_q_expressions(torch.zeros(shape), 1.0, max_size, min_ndim, mode)
                assert kron_factor_kinds(shape, max_size, min_ndim, mode) == [q.dim() == 2 for q in qs], (shape, mode)


def resume(steps, save_at, dtype, **hypers):
    "Weights and state after `steps` steps, with a torch.save round trip of the state_dict after `save_at` (None: none)"
    import io
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in [(4, 3), (5,), (2, 2, 3)]]
    opt = Kron(ps, **hypers)
    torch.manual_seed(0)
    for t in range(steps):
        if t == save_at:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt = Kron(ps, **hypers)
            opt.load_state_dict(torch.load(buf, weights_only=True))
        for p in ps: p.grad = torch.sin(p.detach()) + 0.1 * torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    return [p.detach().clone() for p in ps], opt


@pytest.mark.parametrize('hypers', [dict(), dict(momentum_into_precondition_update=False),
                                    dict(pre_conditioner_update_probability=0.3, balance_prob=0.5)])
def test_float64_params_float32_preconditioner_resume_exactly(hypers):
    straight, opt_a = resume(12, None, torch.float64, **hypers)
    resumed, opt_b = resume(12, 5, torch.float64, **hypers)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    for p_state_a, p_state_b in zip(opt_a.state.values(), opt_b.state.values()):
        assert p_state_a['Q_0'].dtype == p_state_b['Q_0'].dtype == torch.float32
    assert {k: v for k, v in opt_a.param_groups[0].items() if k.startswith('kron_')} == \
           {k: v for k, v in opt_b.param_groups[0].items() if k.startswith('kron_')}


def test_peer_crashes_on_float64_params_with_float32_preconditioner():
    "The deviation the chapter shows: the peer's resumed float32 Q comes back float64 and meets float32 momentum"
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    opt = pytorch_optimizer.Kron([p])
    p.grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    opt.step()
    fresh = pytorch_optimizer.Kron([p])
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    with pytest.raises(RuntimeError): fresh.step()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_zero_gradients_leave_weights_bit_identical(dtype):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [(4, 3), (5,), (), (2, 3, 2)]]
    start = [p.detach().clone() for p in ps]
    opt = Kron(ps, lr=0.1, memory_save_mode=None)
    for _ in range(4):
        for p in ps: p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(ps, start))


def fits_of(steps, **hypers):
    "The steps on which Q changed"
    p = torch.zeros(3, requires_grad=True)
    opt, fits = Kron([p], **hypers), []
    for t in range(1, steps + 1):
        before = opt.state[p]['Q_0'].clone() if opt.state[p] else torch.ones(3)
        p.grad = torch.ones(3)
        opt.step()
        if not torch.equal(before, opt.state[p]['Q_0']): fits.append(t)
    return fits


def test_fit_counter():
    assert fits_of(10) == list(range(1, 11))                                        # default: p = 1 for 500 steps
    assert fits_of(13, pre_conditioner_update_probability=0.3) == [4, 8, 12]       # the counter reaches 10/3
    assert fits_of(9, pre_conditioner_update_probability=1 / 3) == [3, 6, 9]
    assert fits_of(5, pre_conditioner_update_probability=0.0) == []
    seen = []
    fits_of(4, pre_conditioner_update_probability=lambda steps: seen.append(steps) or 1.0)
    assert seen == [0, 1, 2, 3]                                                     # a callable of the steps taken


def test_probes_are_one_randn_like_per_tensor_per_fit_step():
    "The only draws from torch's generator: after k fit steps on tensors of n entries, k·n normals were drawn"
    ps = [torch.zeros(s, requires_grad=True) for s in [(3, 2), (4,)]]
    opt = Kron(ps, pre_conditioner_update_probability=0.5)
    torch.manual_seed(0)
    for _ in range(6):
        for p in ps: p.grad = torch.ones_like(p)
        opt.step()
    after = torch.randn(1)
    torch.manual_seed(0)
    for _ in range(3):                               # fits on steps 2, 4, 6
        for p in ps: torch.randn_like(p)
    assert torch.equal(after, torch.randn(1))


def test_skipped_step_does_not_advance_the_counter():
    p = torch.zeros(3, requires_grad=True)
    opt = Kron([p], pre_conditioner_update_probability=0.5, skip_nonfinite=True)
    p.grad = torch.ones(3)
    opt.step()
    p.grad = torch.full((3,), float('nan'))
    opt.step()
    assert opt.skipped_steps == 1 and opt.param_groups[0]['kron_steps'] == 1 and opt.param_groups[0]['kron_counter'] == 1


def test_bad_hyperparameters_name_kron():
    p = [torch.zeros(2, requires_grad=True)]
    for bad in (dict(pre_conditioner_update_probability=1.5), dict(precondition_lr=2.0), dict(balance_prob=-0.1),
                dict(memory_save_mode='half_diag'), dict(precondition_dtype=torch.int32), dict(momentum=1.0)):
        with pytest.raises(ValueError, match='Kron'): Kron(p, **bad)
    with pytest.raises(ValueError, match='compile=True'): Kron(p, compile=True)


# %% FSDP2: the sharded step equals one process with the same seed

DIST_SHAPES = [(5, 4), (3,), (1, 6), (4, 2, 3)]
DIST_STEPS = 6


def _dist_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(torch.Size(s).numel(), generator=gen).reshape(s) for s in DIST_SHAPES]


def _dist_run(shard=lambda t: t, seed=0):
    "DIST_STEPS steps on fixed gradients; the probes drawn from torch seed `seed` (each rank: its own)"
    params = [nn.Parameter(shard(t)) for t in _dist_tensors(0)]
    opt = Kron(params, lr=0.05, weight_decay=0.1, min_ndim_triangular=1)
    torch.manual_seed(seed)
    for t in range(DIST_STEPS):
        for p, g in zip(params, _dist_tensors(t + 1)): p.grad = shard(g)
        opt.step()
    return params, opt


def _dist_worker(mesh, out_dir):
    from torch.distributed.tensor import DTensor
    rank = mesh.get_rank()
    params, opt = _dist_run(shard_rows(mesh), seed=rank)   # each rank its own seed
    sharded = all(isinstance(v, DTensor) and v.placements == p.placements
                  for p in params for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape)
    replicated, _ = _dist_run(seed=rank)        # plain tensors in a process group, as under DDP
    results = dict(weights=[p.full_tensor() for p in params], sharded_state=sharded,
                   replicated=[p.detach().clone() for p in replicated])
    results['dcp'] = _dcp_round_trip(mesh, rank, out_dir / 'ckpt')
    return results


def _dcp_round_trip(mesh, rank, path):
    """The contract network under FSDP2: 5 steps straight, and 3 steps, `dcp.save` (with the generator's state beside
    it, as a training loop checkpoints it), a fresh model and optimizer, `dcp.load`, the generator restored, 2 steps"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from test_distributed import contract_data, fsdp_model, half, loss_fn
    x, y = (half(t, rank) for t in contract_data())
    def fresh():
        model = fsdp_model(mesh)
        return model, Kron(model.parameters(), lr=1e-2)
    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
    torch.manual_seed(rank)
    model, opt = fresh()
    train(model, opt, 5)
    straight = [p.full_tensor() for p in model.parameters()]
    torch.manual_seed(rank)
    model, opt = fresh()
    train(model, opt, 3)
    msd, osd = get_state_dict(model, opt)
    dcp.save({'model': msd, 'optim': osd}, checkpoint_id=str(path))
    rng = torch.get_rng_state()
    model, opt = fresh()
    msd, osd = get_state_dict(model, opt)
    loaded = {'model': msd, 'optim': osd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=loaded['model'], optim_state_dict=loaded['optim'])
    torch.set_rng_state(rng)
    train(model, opt, 2)
    return straight, [p.full_tensor() for p in model.parameters()]


def test_fsdp2_sharded_step_equals_one_process(tmp_path):
    """FSDP2 and replicated (DDP-style) tensors on 2 ranks seeded differently: both ranks take rank 0's probes; a
    torch.distributed.checkpoint round trip with the generator's state restored continues bit for bit"""
    ranks = rank_results(__file__, tmp_path)
    one, _ = _dist_run()
    init = _dist_tensors(0)
    assert max((p.detach() - q).abs().max().item() for p, q in zip(one, init)) > 1e-2   # it moved
    for r in ranks:
        assert r['sharded_state'], 'a parameter-shaped state tensor is not sharded like its parameter'
        dev = max((a - b.detach()).abs().max().item() for a, b in zip(r['weights'], one))
        assert dev < 1e-6, f'2 ranks vs one process {dev:.2e}'
        assert all(torch.equal(a, b.detach()) for a, b in zip(r['replicated'], one)), 'replicas differ from rank 0'
        straight, resumed = r['dcp']
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), 'dcp round trip: not the uninterrupted run'
    other, _ = _dist_run(seed=1)                 # the test has teeth: rank 1's own probes give other weights
    assert max((p.detach() - q.detach()).abs().max().item() for p, q in zip(other, one)) > 1e-4


if is_rank(__name__): serve_rank(_dist_worker)
