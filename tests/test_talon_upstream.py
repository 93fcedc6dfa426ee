"""TALON beside upstream's own class (Clybius/Personalized-Optimizers `TALON.py` at bfa2fdd, executed from its source
text; skipped without a copy of upstream, see tests/clybius_upstream.py). The float64 transcription in chapter 46 and
tests/test_personalized.py is written from the same reading of upstream as the class; this test is the independent one.

Upstream's spectral clip converts each matrix to float32 (`ortho_dtype=torch.float32`) for its Newton–Schulz
iterations, whatever the weights' dtype, so with the clip on the two agree only to float32 rounding (measured: about
1e-8 of the largest weight over 40 steps); the margin 1e-6 is float32's epsilon (1.2e-7) times a few steps' growth.
With the clip off upstream stays in float64 and the only difference is its 4/π written as 1.27323954474 (4e-12)."""
from __future__ import annotations
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch

from optim_lab.optimizers.talon import TALON
from clybius_upstream import upstream_class

SHAPES = ((5,), (4, 6), (3, 2, 3, 3), (6, 4))     # a vector, two matrices (both orientations), a conv kernel (k = 6)
SETTINGS = [
    (dict(lr=1e-2), 1e-6),
    (dict(lr=1e-2, weight_decay=0.1, weight_decay_rate=0.99), 1e-6),
    (dict(lr=1e-2, denom_atan2=False), 1e-6),
    (dict(lr=3e-3, betas=(0.8, 0.95, 0.999), signscale_power=0.5, spectral_min=0.2, spectral_max=0.5), 1e-6),
    (dict(lr=1e-2, spectral_clip=False), 1e-10),
]


def run(make, steps=40, seed=0):
    "Float64 weights, gradients 0.5 θ plus N(0, 3²) noise, the same draws for both optimizers"
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in SHAPES]
    opt = make(params)
    for _ in range(steps):
        for p in params: p.grad = 0.5 * p.detach() + 3.0 * torch.randn(p.shape, dtype=torch.float64, generator=gen)
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize('hypers,margin', SETTINGS, ids=[str(h) for h, _ in SETTINGS])
def test_talon_vs_upstream_class(hypers, margin):
    upstream = upstream_class('TALON.py', 'TALON')
    ours = run(lambda ps: TALON(ps, **hypers))
    theirs = run(lambda ps: upstream(ps, spectral_clip_compile=False, **hypers))   # eager: the same arithmetic
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs))
    assert worst < margin, worst
