"""Differential tests: AdaBelief, AdaBound, AMSBound, AdamD, DiffGrad and MADGRAD (nbs/20-24) against pytorch-optimizer 4.1,
configured identically, 100 steps, float32, agreement to 1e-5 on three parameter shapes.

Peer-only switches set on every peer: `foreach=False` (its per-parameter path; the foreach path of AdaBelief and
DiffGrad is the same arithmetic), `fixed_decay=False` (its default: decoupled decay scaled by lr, as ours).
Our `decoupled_wd` is the peer's `weight_decouple`. Where a setting needs more, the test says so:
- AMSBound is the peer's `AdaBound(ams_bound=True)`.
- AdamD has no peer class: the peer's `AdamP(adam_debias=True, delta=0.0)` is AdamD (with delta=0 AdamP's projection
  never fires). Decoupled decay only: that AdamP adds the L2 term after updating its moments, so its L2 decay never
  reaches the step (the peer's AdamP bug), and the comparison would test the bug.
- MADGRAD: the peer (like the authors' code) uses lr + eps where the paper has lr, in lambda_k and in decoupled decay;
  we follow the paper and give our optimizer lr + eps to compare. `test_madgrad_peer_lr_plus_eps` shows the difference.
"""
import pytest
import torch

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

from optim_lab.checks import peer_check
from optim_lab.optimizers.adabelief import AdaBelief
from optim_lab.optimizers.adabound import AdaBound, AMSBound
from optim_lab.optimizers.adamd import AdamD
from optim_lab.optimizers.diffgrad import DiffGrad
from optim_lab.optimizers.madgrad import MADGRAD

STEPS, TOL = 100, 1e-5
PEER_SWITCHES = dict(foreach=False)


def peer_names(hypers: dict) -> dict:
    return {('weight_decouple' if k == 'decoupled_wd' else k): v for k, v in hypers.items()}


def check(ours, theirs):
    dev = peer_check(ours, theirs, steps=STEPS)
    assert dev < TOL, dev
    return dev


# (our class, our extra hypers, peer factory name, peer extra kwargs, hypers given to both)
CASES = {
    'AdaBelief': [dict(lr=1e-2),
                  dict(lr=1e-2, weight_decay=0.1, decoupled_wd=False, betas=(0.8, 0.99), eps=1e-8),
                  dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True, maximize=True),
                  dict(lr=1e-2, rectify=True, betas=(0.9, 0.99), eps=1e-8),
                  dict(lr=1e-2, rectify=True, degenerated_to_sgd=False, betas=(0.9, 0.95), weight_decay=0.1, decoupled_wd=False)],
    'AdaBound': [dict(lr=1e-2),
                 dict(lr=1e-2, gamma=0.01, final_lr=0.05, weight_decay=0.1, decoupled_wd=True),
                 dict(lr=1e-2, gamma=0.1, betas=(0.8, 0.99), weight_decay=0.1, decoupled_wd=False, maximize=True),
                 dict(lr=1e-2, gamma=0.05, ams_bound=True, eps=1e-6)],
    'AMSBound': [dict(lr=1e-2),
                 dict(lr=1e-2, gamma=0.05, final_lr=0.05, betas=(0.9, 0.9), weight_decay=0.1, decoupled_wd=False)],
    'AdamD': [dict(lr=1e-2, decoupled_wd=True),
              dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, decoupled_wd=True),
              dict(lr=1e-2, eps=1e-6, weight_decay=0.5, decoupled_wd=True, maximize=True)],
    'DiffGrad': [dict(lr=1e-2),
                 dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, decoupled_wd=False),
                 dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True, maximize=True)],
    'MADGRAD': [dict(lr=1e-2),
                dict(lr=1e-2, momentum=0.5, weight_decay=0.1, decoupled_wd=False),
                dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True, maximize=True),
                dict(lr=1e-2, momentum=0.0, weight_decay=0.1, decoupled_wd=True),
                dict(lr=3e-3, momentum=0.0, eps=1e-8)],
}


def factories(name: str, hypers: dict):
    po = pytorch_optimizer
    theirs = peer_names(hypers)
    if name == 'AdaBelief': return (lambda ps: AdaBelief(ps, **hypers)), (lambda ps: po.AdaBelief(ps, **theirs, fixed_decay=False, **PEER_SWITCHES))
    if name == 'AdaBound': return (lambda ps: AdaBound(ps, **hypers)), (lambda ps: po.AdaBound(ps, **theirs, fixed_decay=False, **PEER_SWITCHES))
    if name == 'AMSBound': return (lambda ps: AMSBound(ps, **hypers)), (lambda ps: po.AdaBound(ps, ams_bound=True, **theirs, fixed_decay=False, **PEER_SWITCHES))
    if name == 'AdamD': return (lambda ps: AdamD(ps, **hypers)), (lambda ps: po.AdamP(ps, adam_debias=True, delta=0.0, **theirs, fixed_decay=False, **PEER_SWITCHES))
    if name == 'DiffGrad': return (lambda ps: DiffGrad(ps, **hypers)), (lambda ps: po.DiffGrad(ps, **theirs, fixed_decay=False, **PEER_SWITCHES))
    if name == 'MADGRAD':
        eps = hypers.get('eps', 1e-6)
        ours = {**hypers, 'lr': hypers['lr'] + eps}  # the peer's lambda_k and decay use lr + eps
        return (lambda ps: MADGRAD(ps, **ours)), (lambda ps: po.MADGRAD(ps, **theirs, **PEER_SWITCHES))
    raise KeyError(name)


@pytest.mark.parametrize('name,hypers', [(n, h) for n, hs in CASES.items() for h in hs],
                         ids=[f'{n}-{h}' for n, hs in CASES.items() for h in hs])
def test_matches_pytorch_optimizer(name, hypers):
    check(*factories(name, hypers))


def test_adabelief_peer_foreach_path_agrees_too():
    "The peer's default (foreach) path is the same arithmetic"
    check(lambda ps: AdaBelief(ps, lr=1e-2, weight_decay=0.1),
          lambda ps: pytorch_optimizer.AdaBelief(ps, lr=1e-2, weight_decay=0.1, foreach=True))


def test_comparisons_have_teeth():
    "A wrong setting on one side is caught: the tests compare the rules, not just two things that barely move"
    dev = peer_check(lambda ps: AdaBelief(ps, lr=1e-2, rectify=True), lambda ps: pytorch_optimizer.AdaBelief(ps, lr=1e-2, foreach=False), steps=STEPS)
    assert dev > 1e-3
    dev = peer_check(lambda ps: AdamD(ps, lr=1e-2, decoupled_wd=True), lambda ps: pytorch_optimizer.AdamP(ps, lr=1e-2, delta=0.0, foreach=False), steps=STEPS)
    assert dev > 1e-4  # AdamP without adam_debias is Adam: the first steps differ
    dev = peer_check(lambda ps: AMSBound(ps, lr=1e-2, betas=(0.9, 0.9)), lambda ps: pytorch_optimizer.AdaBound(ps, lr=1e-2, betas=(0.9, 0.9), foreach=False), steps=STEPS)
    assert dev > 1e-4
    dev = peer_check(lambda ps: DiffGrad(ps, lr=1e-2), lambda ps: pytorch_optimizer.AdamP(ps, lr=1e-2, delta=0.0, foreach=False), steps=STEPS)
    assert dev > 1e-3


def test_madgrad_peer_lr_plus_eps():
    "The chapter's claim: with the same lr, the peer's lambda_k = (lr + eps) sqrt(k+1) makes it differ from the paper's rule"
    dev = peer_check(lambda ps: MADGRAD(ps, lr=1e-2), lambda ps: pytorch_optimizer.MADGRAD(ps, lr=1e-2, foreach=False), steps=STEPS)
    assert dev > TOL


def test_adabound_final_lr_follows_lr_schedule_like_peer():
    "Both scale final_lr by lr / initial lr when the learning rate is changed after construction"
    def halve(opt):
        for g in opt.param_groups: g['lr'] = g['lr'] / 2
        return opt
    check(lambda ps: halve(AdaBound(ps, lr=1e-2, gamma=0.05)),
          lambda ps: halve(pytorch_optimizer.AdaBound(ps, lr=1e-2, gamma=0.05, **PEER_SWITCHES)))
