"OrthoGrad (chapter 81): the authors' rule in float64 around independent optimizers, pytorch-optimizer 4.1, the wrapper's pass-through"
from __future__ import annotations

import pytest
import torch
import pytorch_optimizer

from optim_lab.orthograd import OrthoGrad, orthogonalize_
from optim_lab.optimizers.adam import AdamW
from distributed_harness import is_rank, rank_results, serve_rank, shard_rows


def authors_rule(w, g):
    "g⊥‖g‖/‖g⊥‖, g⊥ = g − ⟨w, g⟩/(⟨w, w⟩ + 1e-30) w, per tensor, as a plain float64 computation"
    wf, gf = w.reshape(-1).double(), g.reshape(-1).double()
    perp = gf - torch.dot(wf, gf) / (torch.dot(wf, wf) + 1e-30) * wf
    return (perp * gf.norm() / perp.norm()).reshape(g.shape)


def problem(seed=0, dtype=torch.float64, steps=40):
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(7, generator=g, dtype=dtype), torch.randn(4, 5, generator=g, dtype=dtype)]
    noise = [[torch.randn(x.shape, generator=g, dtype=dtype) for x in start] for _ in range(steps)]
    return start, noise


def run(make, start, noise):
    ps = [x.clone().requires_grad_() for x in start]
    opt = make(ps)
    for xi in noise:
        for p, n in zip(ps, xi): p.grad = p.detach() + n
        opt.step()
    return ps


def test_sgd_momentum_matches_transcription():
    start, noise = problem()
    ours = run(lambda ps: OrthoGrad(torch.optim.SGD, params=ps, lr=1e-2, momentum=0.9), start, noise)
    thetas, bufs = [x.clone() for x in start], [None, None]
    for xi in noise:
        for i, n in enumerate(xi):
            g = authors_rule(thetas[i], thetas[i] + n)
            bufs[i] = g if bufs[i] is None else 0.9 * bufs[i] + g
            thetas[i] = thetas[i] - 1e-2 * bufs[i]
    assert max((a.detach() - b).abs().max() for a, b in zip(ours, thetas)) < 1e-12


@pytest.mark.parametrize('foreach', [None, True])
def test_matches_peer(foreach):
    start, noise = problem(1, torch.float32, 100)
    ours = run(lambda ps: OrthoGrad(AdamW, params=ps, lr=1e-2, weight_decay=0.01), start, noise)
    theirs = run(lambda ps: pytorch_optimizer.OrthoGrad(torch.optim.AdamW, params=ps, lr=1e-2, weight_decay=0.01,
                                                         foreach=foreach), start, noise)
    assert max((a - b).abs().max() for a, b in zip(ours, theirs)) < 1e-5


def test_projection_is_orthogonal_keeps_norm_and_zeroes_parallel():
    w, g = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    u = orthogonalize_([w], [g.clone()])[0]
    assert abs((u * w).sum()) < 1e-12 and abs(u.norm() - g.norm()) < 1e-12
    assert torch.equal(orthogonalize_([w.float()], [2 * w.float()])[0], torch.zeros(6, 3))
    assert torch.equal(orthogonalize_([torch.zeros(4)], [torch.ones(4)])[0], torch.ones(4))


def test_one_vector_form_is_torchzeros():
    "Over several tensors at once (the modular chain's tensorwise=False) it is one projection of the concatenation"
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    ga, gb = torch.randn(5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    out = orthogonalize_([a, b], [ga.clone(), gb.clone()], eps=0.0)
    flat = authors_rule(torch.cat([a, b.reshape(-1)]), torch.cat([ga, gb.reshape(-1)]))
    assert (torch.cat([out[0], out[1].reshape(-1)]) - flat).abs().max() < 1e-12


def test_modular_orthograd_uses_the_same_function():
    from optim_lab.modular import ops
    assert ops.orthogonalize_ is orthogonalize_


def test_pass_through_and_exact_resume():
    start, noise = problem(2, torch.float32, 12)
    ps = [x.clone().requires_grad_() for x in start]
    inner = AdamW(ps, lr=1e-2)
    opt = OrthoGrad(inner)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    for t, xi in enumerate(noise):
        if t == 5:
            saved = opt.state_dict()
            assert saved['state'][0]['step'] == 5
            opt = OrthoGrad(AdamW, params=ps, lr=1e-2)
            opt.load_state_dict(saved)
        for p, n in zip(ps, xi): p.grad = p.detach() + n
        opt.step()
    uninterrupted = run(lambda qs: OrthoGrad(AdamW, params=qs, lr=1e-2), start, noise)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ps, uninterrupted))
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_closure_gradients_are_projected():
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w0 = w.detach().clone()
    target = torch.randn(5, 4, dtype=torch.float64)
    opt = OrthoGrad(torch.optim.SGD([w], lr=0.1))
    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert torch.isclose(loss, ((w0 - target) ** 2).sum())
    assert (w.detach() - (w0 - 0.1 * authors_rule(w0, 2 * (w0 - target)))).abs().max() < 1e-12


def test_bf16_is_projected_in_float32():
    w = torch.randn(8, 8).to(torch.bfloat16).requires_grad_()
    g = torch.randn(8, 8).to(torch.bfloat16)
    w.grad = g.clone()
    OrthoGrad(torch.optim.SGD([w], lr=0.0)).project_gradients()
    expected = authors_rule(w.detach().float(), g.float()).to(torch.bfloat16)
    assert w.grad.dtype == torch.bfloat16 and (w.grad.float() - expected.float()).abs().max() <= 2 ** -7 * expected.abs().max()


def test_construction_errors():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match='pass its `params`'): OrthoGrad(AdamW, lr=1e-2)
    with pytest.raises(TypeError, match='this is an instance'): OrthoGrad(AdamW([w]), lr=1e-2)
    with pytest.raises(ValueError, match=r'OrthoGrad: eps=-1.0 is outside the allowed range \(0, ∞\)'): OrthoGrad(AdamW([w]), eps=-1.0)
    assert type(OrthoGrad('adamw', params=[w]).optimizer) is AdamW


def test_sparse_gradient_refused():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match='OrthoGrad does not support sparse gradients'):
        OrthoGrad(torch.optim.SGD(emb.parameters(), lr=0.1)).step()


# %% FSDP2: every inner product and norm is a reduction over the whole (sharded) tensor

DIST_SHAPES = [(5, 2, 3, 3), (3, 16), (1, 3), (7,)]   # uneven shards; rank 1 holds no row of (1, 3)


def _dist_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(torch.Size(s).numel(), generator=gen).reshape(s) for s in DIST_SHAPES]


def _dist_run(shard=lambda t: t, steps=6):
    params = [torch.nn.Parameter(shard(t)) for t in _dist_tensors(0)]
    opt = OrthoGrad(AdamW, params=params, lr=1e-2)
    for t in range(steps):
        for p, g in zip(params, _dist_tensors(t + 1)): p.grad = shard(g)
        opt.step()
    return params


def _dist_worker(mesh, out_dir):
    return [p.full_tensor() for p in _dist_run(shard_rows(mesh))]


def test_fsdp2_sharded_step_equals_one_process(tmp_path):
    ranks = rank_results(__file__, tmp_path)
    one = _dist_run()
    for r in range(2):
        dev = max((a - b.detach()).abs().max().item() for a, b in zip(ranks[r], one))
        assert dev < 1e-6, f'rank {r}: 2 ranks vs one process {dev:.2e}'


if is_rank(__name__): serve_rank(_dist_worker)
