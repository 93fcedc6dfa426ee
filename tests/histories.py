"""Shared by the differential tests: run optimizers on identical parameters and gradients, and compare the iterates.

Every parameter of `shapes` sits in one optimizer and gets g_t = theta_{t-1} + noise_t, with the same noise on both
sides, so two optimizers configured identically must produce the same history of iterates.
"""
from __future__ import annotations
import math

import pytest
import torch

STEPS = 100
SHAPES = [(7,), (4, 5), (3, 2, 2)]
RTOL, ATOL = 1e-5, 1e-5


def run(factory, steps=STEPS, seed=0, noise=1.0, dtype=torch.float32, shapes=SHAPES):
    "All iterates of one optimizer over parameters of `shapes`, fed g_t = theta_{t-1} + noise_t"
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    noises = [[noise * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    opt = factory(ps)
    history = [[p.detach().clone() for p in ps]]
    for t in range(steps):
        for p, xi in zip(ps, noises[t]): p.grad = (p.detach().double() + xi).to(dtype)
        opt.step()
        history.append([p.detach().clone() for p in ps])
    return history


def deviation(ours, theirs) -> float:
    "Largest |difference| between two histories (inf if either is non-finite)"
    worst = 0.0
    for a_t, b_t in zip(ours, theirs, strict=True):
        for a, b in zip(a_t, b_t, strict=True):
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()): return math.inf
            if a.numel(): worst = max(worst, (a.double() - b.double()).abs().max().item())
    return worst


def assert_close_histories(ours, theirs, what, rtol=RTOL, atol=ATOL) -> float:
    "Fail at the first iterate where the histories differ beyond tolerance (or the run barely moved); else the deviation"
    moved = max((a.double() - b.double()).abs().max().item() for a, b in zip(ours[-1], ours[0]) if a.numel())
    assert moved > 1e-2, f'{what}: parameters barely moved; the comparison would be vacuous'
    for t, (a_t, b_t) in enumerate(zip(ours, theirs, strict=True)):
        for i, (a, b) in enumerate(zip(a_t, b_t, strict=True)):
            assert torch.isfinite(a).all(), f'{what}: ours is non-finite at step {t}'
            assert torch.isfinite(b).all(), f'{what}: the other side is non-finite at step {t}'
            if not torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol):
                pytest.fail(f'{what}: step {t}, param {i}: max |diff| {(a.double() - b.double()).abs().max().item():.3e}')
    return deviation(ours, theirs)
