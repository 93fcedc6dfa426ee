"""AdamMini (chapter 73) against a float64 transcription of Zhang et al. 2024 and against pytorch-optimizer 4.1.

The reference is the paper's update as a plain loop: m an EMA of g, one v per block (the whole tensor, or `blocks`
equal slices of dim 0) an EMA of the block's mean g², both bias-corrected. The peer takes a model and partitions it
by parameter names; parameters under names outside its special partitions are one block each, which is ours.
"""
from __future__ import annotations
import copy

import pytest
import torch
from torch import nn

from optim_lab import load_optimizer
from optim_lab.checks import reference_check
from histories import run, assert_close_histories
from distributed_harness import is_rank, rank_results, serve_rank

AdamMini = load_optimizer('AdamMini')
Adam = load_optimizer('Adam')
SHAPES = ((7,), (4, 5), (6, 2, 3))


def adam_mini_reference(theta, grad_fn, steps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                        decoupled_wd=True, maximize=False, blocks=1):
    beta1, beta2 = betas
    m = torch.zeros_like(theta)
    v = [0.0] * blocks
    rows = theta.shape[0] // blocks
    iterates = []
    for t in range(1, steps + 1):
        g = grad_fn(theta, t)
        if maximize: g = -g
        if decoupled_wd: theta = theta * (1 - lr * weight_decay)
        else: g = g + weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        parts = []
        for b in range(blocks):
            block = slice(b * rows, (b + 1) * rows)
            v[b] = beta2 * v[b] + (1 - beta2) * (g[block] ** 2).mean().item()
            m_hat, v_hat = m[block] / (1 - beta1 ** t), v[b] / (1 - beta2 ** t)
            parts.append(theta[block] - lr * m_hat / (v_hat ** 0.5 + eps))
        theta = torch.cat(parts)
        iterates.append(theta)
    return iterates


SETTINGS = [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1),
            dict(lr=3e-2, weight_decay=0.2, decoupled_wd=False, maximize=True), dict(lr=1e-3, eps=0.0)]

@pytest.mark.parametrize('hypers', SETTINGS, ids=str)
def test_matches_the_paper(hypers):
    dev = reference_check(AdamMini, adam_mini_reference, steps=50, shapes=SHAPES, **hypers)
    assert dev < 1e-10, dev


@pytest.mark.parametrize('blocks', [2, 4])
def test_blocks_match_the_paper(blocks):
    shapes = ((4, 5), (8, 2, 3), (12,))
    dev = reference_check(AdamMini, adam_mini_reference, steps=50, shapes=shapes, lr=1e-2, blocks=blocks)
    assert dev < 1e-10, dev


def test_one_block_is_not_adam():
    "The check can fail: per-coordinate Adam differs from one block per tensor by far more than the tolerance"
    def adam_reference(theta, grad_fn, steps, lr, **kw):
        m, v, out = torch.zeros_like(theta), torch.zeros_like(theta), []
        for t in range(1, steps + 1):
            g = grad_fn(theta, t)
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            theta = theta - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
            out.append(theta)
        return out
    assert reference_check(AdamMini, adam_reference, steps=50, shapes=SHAPES, lr=1e-2) > 1e-3


def test_blocks_must_divide_dim0():
    with pytest.raises(ValueError, match='AdamMini: blocks=3'): AdamMini([torch.zeros(4, 2, requires_grad=True)], blocks=3)
    opt = AdamMini([torch.zeros(4, 2, requires_grad=True)], blocks=2)
    with pytest.raises(ValueError, match='blocks=2'): opt.add_param_group({'params': [torch.zeros(3, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_state_under_six_tenths_of_adam():
    "m is a full tensor, v one number per tensor: 4 bytes per parameter (+4 per tensor) against Adam's 8"
    def state_bytes(opt):
        return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    layer = nn.Linear(1024, 1024)
    sizes = {}
    for cls in (AdamMini, Adam):
        opt = cls(layer.parameters())
        for p in layer.parameters(): p.grad = torch.randn_like(p)
        opt.step()
        sizes[cls.__name__] = state_bytes(opt) / sum(p.numel() for p in layer.parameters())
    assert sizes['Adam'] == 8 and sizes['AdamMini'] < 0.6 * sizes['Adam'], sizes
    assert abs(sizes['AdamMini'] - 4) < 1e-3, sizes


# %% pytorch-optimizer

po = pytest.importorskip('pytorch_optimizer')

def peer(params, **hypers):
    "The peer's AdamMini over a module holding these very tensors under plain names (one block each)"
    holder = nn.Module()
    for i, p in enumerate(params): holder._parameters[f'weight{i}'] = p
    return po.AdamMini(holder, **hypers)

PEER_SETTINGS = [dict(lr=1e-2, weight_decay=0.0), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1),
                 dict(lr=3e-2, weight_decay=0.0, eps=1e-6)]

@pytest.mark.parametrize('hypers', PEER_SETTINGS, ids=str)
def test_vs_pytorch_optimizer(hypers):
    assert_close_histories(run(lambda ps: AdamMini(ps, **hypers)), run(lambda ps: peer(ps, **hypers)), f'AdamMini{hypers}')


# %% Resume

def _steps(opt, ps, t0, t1):
    for t in range(t0, t1):
        g = torch.Generator().manual_seed(t)
        for p in ps: p.grad = torch.sin(3 * p.detach()) + 0.3 * torch.randn(p.shape, generator=g)
        opt.step()

@pytest.mark.parametrize('hypers', [dict(lr=1e-2), dict(lr=1e-2, blocks=2, weight_decay=0.1)], ids=str)
def test_resume_is_bit_exact(hypers):
    shapes = ((4, 5), (6, 2, 3), (8,))
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    a = [x.clone().requires_grad_() for x in start]
    opt_a = AdamMini(a, **hypers); _steps(opt_a, a, 0, 20)
    b = [x.clone().requires_grad_() for x in start]
    opt_b = AdamMini(b, **hypers); _steps(opt_b, b, 0, 8)
    saved = copy.deepcopy(opt_b.state_dict())
    c = [x.detach().clone().requires_grad_() for x in b]
    opt_c = AdamMini(c, **hypers); opt_c.load_state_dict(saved); _steps(opt_c, c, 8, 20)
    for x, y in zip(a, c): assert torch.equal(x, y)


def test_compiled_blocks_match_eager():
    shapes = ((4, 5), (6, 2, 3), (8,))
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    out = []
    for compile in (False, True):
        ps = [x.clone().requires_grad_() for x in start]
        opt = AdamMini(ps, lr=1e-2, blocks=2, compile=compile)
        _steps(opt, ps, 0, 20)
        out.append(ps)
    for x, y in zip(*out): torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# %% Per-head blocks on FSDP2-sharded parameters (the registry-wide FSDP2 contract runs the default, blocks=1)

def _blocks_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))  # 6 rows on 2 ranks; 4 rows: 2 blocks of 2

def _blocks_train(model, steps=6):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
    opt = AdamMini(model.parameters(), lr=3e-2, blocks=2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

def _fsdp_blocks_worker(mesh, out_dir):
    "On each of the 2 ranks: the same full batch on both, FSDP2-sharded; the full weights"
    from torch.distributed.fsdp import fully_shard
    from optim_lab.distributed import full_tensor
    model = _blocks_model()
    for layer in (model[0], model[2]): fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _blocks_train(model)
    return [full_tensor(p.detach()) for p in model.parameters()]

def test_blocks_under_fsdp2_match_one_process(tmp_path):
    sharded = rank_results(__file__, tmp_path)[0]   # rank 0's
    model = _blocks_model()
    _blocks_train(model)
    for a, b in zip(sharded, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(sharded, _blocks_model().parameters())) > 1e-2  # it moved


if is_rank(__name__): serve_rank(_fsdp_blocks_worker)
