"""FCompass beside upstream's own class (Clybius/Personalized-Optimizers `FCompass.py` at bfa2fdd, executed from its
source text; skipped without a copy of upstream, see tests/clybius_upstream.py). The float64 transcription of chapter 45
is written from the same reading of upstream as our class; this test is the independent one.

Both run in float64 on the same weights and gradients. Upstream computes the same arithmetic in another order (its
clip divides by max(1, RMS)/c where ours multiplies by c/max(1, RMS); it moves p with one addcdiv_), so the two agree to
float64 rounding over the 40 steps (measured: at most 4.3e-16 of the largest weight, over the six settings). The
margin 1e-12 leaves room for rounding that grows through the Fisher normaliser and the max-average on other CPUs and
thread counts, and is far below any real difference: a term off by 0.5% (amp_fac 2.01) moves the weights by 7e-4 of
the largest, β2 0.998 by 0.26 (test_the_margin_has_teeth).

Upstream centres `p.grad` in place (chapter 45 shows it): each optimizer gets its own copy of every gradient, and the
test checks that upstream's step changed the caller's gradient where ours did not."""
from __future__ import annotations
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch

from optim_lab.optimizers.fcompass import FCompass
from clybius_upstream import upstream_class

SHAPES = ((5,), (4, 6), (3, 2, 3, 3), (6, 4))     # a vector (not centred), two matrices, a conv kernel
SETTINGS = [
    dict(),                                                        # upstream's defaults: λ = 0.1, c = 1, κ = 1
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.9, 0.99), amp_fac=1.0, eps=1e-6),
    dict(lr=3e-3, weight_decay=0.0, clip=0.0),                     # the clip and the decay switched off
    dict(lr=1e-2, clip=0.5, centralization=0.5, weight_decay=0.01),
    dict(lr=1e-2, centralization=0.0, clip=2.0),
]
MARGIN = 1e-12


def run(make, steps=40, seed=0, scale=3.0):
    """Weights after `steps`, float64, gradients 0.5 θ plus N(0, scale²) noise (scale 3: the natural gradient's RMS
    exceeds 1, so the clip acts), the same draws for both optimizers; and whether a step changed the caller's gradient"""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in SHAPES]
    opt, touched = make(params), False
    for _ in range(steps):
        grads = [0.5 * p.detach() + scale * torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params]
        for p, g in zip(params, grads): p.grad = g.clone()
        opt.step()
        touched |= any(not torch.equal(p.grad, g) for p, g in zip(params, grads))
    return [p.detach() for p in params], touched


def deviation(a, b) -> float:
    "The largest difference between two sets of weights, relative to the largest weight of each tensor"
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


@pytest.mark.parametrize('hypers', SETTINGS, ids=[str(h) for h in SETTINGS])
def test_fcompass_vs_upstream_class(hypers):
    upstream = upstream_class('FCompass.py', 'FCompass')
    (ours, ours_touched), (theirs, theirs_touched) = run(lambda ps: FCompass(ps, **hypers)), run(lambda ps: upstream(ps, **hypers))
    assert deviation(ours, theirs) < MARGIN
    assert not ours_touched                                        # ours leaves the caller's gradient alone ...
    assert theirs_touched == (hypers.get('centralization', 1.0) != 0)   # ... upstream centres it in place


def test_the_margin_has_teeth():
    "A one-term difference (amp_fac 2 against 2.01, or β2 0.999 against 0.998) is far outside the margin (7e-4, 0.26)"
    upstream = upstream_class('FCompass.py', 'FCompass')
    theirs, _ = run(lambda ps: upstream(ps, lr=1e-2))
    for other in (dict(amp_fac=2.01), dict(betas=(0.99, 0.998))):
        ours, _ = run(lambda ps: FCompass(ps, lr=1e-2, **other))
        assert deviation(ours, theirs) > 1e3 * MARGIN, other
