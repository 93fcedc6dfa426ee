"Differential test: optim_lab's LAMB against pytorch_optimizer's Lamb, configured identically (see nbs/15_lamb.ipynb)"
import pytest
import torch
from peer_versions import peer_is

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

from optim_lab.checks import peer_check
from optim_lab.optimizers.lamb import LAMB

# pytorch_optimizer.Lamb never bias-corrects, and by default multiplies the trust-ratio-normalised step by
# 1/(1 - beta1^t): `adam_debias=True` removes that factor, which makes it our `bias_correction=False`.
# `weight_decouple=False` puts weight decay inside the trust ratio (the paper's form, and ours); it clamps
# ||theta|| at 10 (`Lamb.clamp`), so we use `clamp_value=10`. It divides by ||u|| + eps, we by ||u||:
# a relative difference of about eps / ||u||, far below float32 tolerance here.
SETTINGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01),
    dict(lr=1e-2, weight_decay=0.5, maximize=True),
]


@pytest.mark.parametrize('hypers', SETTINGS, ids=str)
@pytest.mark.parametrize('foreach', [False, True])
def test_lamb_matches_pytorch_optimizer(hypers, foreach):
    ours = lambda ps: LAMB(ps, bias_correction=False, clamp_value=pytorch_optimizer.Lamb.clamp, **hypers)
    peer = lambda ps: pytorch_optimizer.Lamb(ps, weight_decouple=False, adam_debias=True, foreach=foreach, **hypers)
    dev = peer_check(ours, peer, steps=100)
    assert dev < 1e-5, dev


def test_lamb_clamp_matters():
    "The comparison has teeth: with large weights, an unmatched clamp is caught"
    ours = lambda ps: LAMB(ps, lr=1e-2, bias_correction=False)  # no clamp
    peer = lambda ps: pytorch_optimizer.Lamb(ps, lr=1e-2, weight_decouple=False, adam_debias=True)
    big = lambda ps: [p.data.mul_(10) for p in ps] and ours(ps)
    big_peer = lambda ps: [p.data.mul_(10) for p in ps] and peer(ps)
    assert peer_check(big, big_peer, steps=20) > 1e-3


def test_lamb_peer_default_first_step_is_ten_times_ours():
    "The chapter's claim: pytorch_optimizer.Lamb's default (adam_debias=False) multiplies the normalised step by 1/(1-beta1^t)"
    gen = torch.Generator().manual_seed(0)
    theta0, grad = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    steps = []
    for make in (lambda ps: LAMB(ps, lr=1e-3, clamp_value=10.0), lambda ps: pytorch_optimizer.Lamb(ps, lr=1e-3)):
        p = theta0.clone().requires_grad_(True)
        before = p.detach().clone()
        opt = make([p])
        p.grad = grad.clone()
        opt.step()
        steps.append((p.detach() - before).norm().item())
    # ours: the trust ratio ||w|| / ||u|| (||w|| < clamp_value here) makes the first step's norm lr·||w||
    assert abs(steps[0] / (1e-3 * theta0.norm().item()) - 1) < 1e-4, steps
    if peer_is('pytorch_optimizer'): assert abs(steps[1] / steps[0] - 10.0) < 1e-3, steps
