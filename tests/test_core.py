"""The base class, the registry and the check harness themselves (the contract in test_contract.py runs every
optimizer through the base; these tests pin down the base's own pieces)."""
from __future__ import annotations
import math

import pytest
import torch

from optim_lab.core import LabOptimizer, NonNegative, stochastic_round
from optim_lab.checks import max_deviation, reference_check
from optim_lab import load_optimizer


# %% Stochastic rounding

def _neighbours(x: torch.Tensor, dtype):
    "The representable values of `dtype` just below-or-at and just above `x`"
    near = x.to(dtype)
    down = torch.where(near.float() <= x, near, torch.nextafter(near, torch.tensor(-math.inf, dtype=dtype)))
    return down, torch.nextafter(down, torch.tensor(math.inf, dtype=dtype))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_round_is_unbiased_and_brackets(dtype):
    torch.manual_seed(0)
    # both signs, from fp16's subnormals to large values, and values exactly halfway between neighbours
    x = torch.randn(256) * torch.logspace(-7, 4, 256)
    down, up = _neighbours(x, dtype)
    x = torch.cat([x, (down.float() + up.float()) / 2])
    down, up = _neighbours(x, dtype)
    draws = torch.stack([stochastic_round(x, dtype) for _ in range(3000)])
    assert draws.dtype == dtype
    assert ((draws == down) | (draws == up)).all(), 'a draw is not one of the two neighbours'
    gap = up.float() - down.float()
    err = (draws.float().mean(0) - x) / gap  # in units of the spacing; standard error <= 0.5 / sqrt(3000)
    assert err.abs().max() < 5 * 0.5 / math.sqrt(3000), err.abs().max()
    # round-to-nearest, the biased alternative, fails the same test
    assert ((x.to(dtype).float() - x) / gap).abs().max() > 0.3


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_round_keeps_representable_and_special_values(dtype):
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.125, 3.0, math.inf, -math.inf]).to(dtype)
    for _ in range(50): assert torch.equal(stochastic_round(exact.float(), dtype), exact)
    assert stochastic_round(torch.tensor([math.nan]), dtype).isnan().all()


# %% The base class

class GD(LabOptimizer):
    "Gradient descent: the smallest subclass"
    def __init__(self, params, lr=0.1, weight_decay=0.0, decoupled_wd=False, maximize=False, **kwargs):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, decoupled_wd=decoupled_wd, maximize=maximize), **kwargs)
    def update(self, p, grad, state, group): return grad


def test_bf16_step_is_unbiased():
    "A step of lr*g far below bf16's spacing still moves the weights by the right amount on average"
    torch.manual_seed(0)
    w = torch.full((20_000,), 1.0, dtype=torch.bfloat16, requires_grad=True)
    opt = GD([w], lr=1e-4)
    for _ in range(20):
        w.grad = torch.ones_like(w)
        opt.step()
    assert w.dtype == torch.bfloat16
    assert abs(w.float().mean().item() - (1 - 20 * 1e-4)) < 2e-4


@pytest.mark.parametrize('decoupled', [False, True])
@pytest.mark.parametrize('maximize', [False, True])
def test_weight_decay_order_matches_torch(decoupled, maximize):
    "L2: g <- (+-g) + wd*theta; decoupled: theta <- (1 - lr*wd) theta, then the step (torch.optim's order)"
    theta, g = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -0.7])
    w = theta.clone().requires_grad_()
    opt = GD([w], lr=0.1, weight_decay=0.2, decoupled_wd=decoupled, maximize=maximize)
    w.grad = g.clone()
    opt.step()
    sg = -g if maximize else g
    expected = theta * (1 - 0.1 * 0.2) - 0.1 * sg if decoupled else theta - 0.1 * (sg + 0.2 * theta)
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-7)
    ref_w = theta.clone().requires_grad_()
    ref = torch.optim.SGD([ref_w], lr=0.1, weight_decay=0.2, maximize=maximize) if not decoupled else None
    if ref is not None:
        ref_w.grad = g.clone()
        ref.step()
        assert torch.equal(w.detach(), ref_w.detach())


def test_hyperparameter_changed_after_construction_is_checked():
    "Refused as it is written (the group keeps its value); a group replaced by a plain dict is refused at step"
    w = torch.ones(2, requires_grad=True)
    opt = GD([w])
    w.grad = torch.ones(2)
    opt.step()
    before, state = w.detach().clone(), dict(opt.state[w])
    with pytest.raises(ValueError, match=r'GD: weight_decay=nan is outside the allowed range \[0, ∞\)'):
        opt.param_groups[0]['weight_decay'] = math.nan
    assert opt.param_groups[0]['weight_decay'] == 0.0
    opt.param_groups[0] = {**opt.param_groups[0], 'weight_decay': math.nan}
    calls = []
    with pytest.raises(ValueError, match=r'GD: weight_decay=nan is outside the allowed range \[0, ∞\)'):
        opt.step(lambda: calls.append(1))
    assert calls == [], 'the closure ran before the check'
    assert torch.equal(w.detach(), before) and opt.state[w] == state


def test_range_accepts_numpy_scalars_and_rejects_others():
    np = pytest.importorskip('numpy')
    assert NonNegative.allows(np.float32(0.1)) and NonNegative.allows(np.float64(0.1)) and NonNegative.allows(3)
    for bad in (True, '0.1', None, torch.tensor(0.1), np.float64('nan'), -1e-9):
        assert not NonNegative.allows(bad), bad


# %% The check harness

def test_max_deviation_never_hides_nan_or_inf():
    ok = torch.ones(3, dtype=torch.float64)
    nan = torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64)
    assert max_deviation([ok, ok], [ok, nan]) == math.inf
    assert max_deviation([nan], [nan]) == math.inf
    assert max_deviation([ok * math.inf], [ok * math.inf]) == math.inf
    assert max_deviation([ok], [ok + 1e-3]) == pytest.approx(1e-3)


def test_max_deviation_refuses_mismatches():
    ok = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match='shapes'): max_deviation([ok], [ok[None]])
    with pytest.raises(ValueError, match='iterates'): max_deviation([ok], [ok, ok])


def _gd_reference(theta, grad_fn, steps, lr):
    out = []
    for t in range(1, steps + 1):
        theta = theta - lr * grad_fn(theta, t)
        out.append(theta)
    return out


def test_reference_check_catches_wrong_optimizers():
    assert reference_check(GD, _gd_reference, lr=0.1) < 1e-12
    # a reference that is right only at the last step, or that blows up, or that runs in float32
    last_only = lambda theta, grad_fn, steps, lr: [theta] * (steps - 1) + _gd_reference(theta, grad_fn, steps, lr)[-1:]
    assert reference_check(GD, last_only, lr=0.1) > 1e-3
    blows_up = lambda theta, grad_fn, steps, lr: [x * math.nan for x in _gd_reference(theta, grad_fn, steps, lr)]
    assert reference_check(GD, blows_up, lr=0.1) == math.inf
    in_float32 = lambda *a, **k: [x.float() for x in _gd_reference(*a, **k)]
    with pytest.raises(ValueError, match='float64'): reference_check(GD, in_float32, lr=0.1)


# %% The registry

def test_register_refuses_a_different_class_with_a_taken_name():
    from optim_lab.registry import register, _REGISTRY
    adam = load_optimizer('Adam')
    keys = set(_REGISTRY)
    clash = type('Adam', (LabOptimizer,), {'__module__': 'elsewhere'})
    with pytest.raises(ValueError, match="already taken by Adam"): register(clash)
    alias_clash = type('BrandNew', (LabOptimizer,), {'__module__': 'elsewhere'})
    with pytest.raises(ValueError, match="'adamw' is already taken"): register(alias_clash, aliases=('adam_w',))
    assert set(_REGISTRY) == keys and load_optimizer('adam') is adam
    with pytest.raises(TypeError): register(type('NotAnOptimizer', (), {}))
