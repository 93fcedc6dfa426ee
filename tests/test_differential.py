"""optim_lab against torch.optim (and pytorch-optimizer where it has the identical algorithm).

Both sides get the same parameters (several shapes, in one optimizer) and the same gradients
g_t = theta_{t-1} + noise_t for 100 steps, in float32; every iterate must agree to float tolerance.
"""
from __future__ import annotations
import inspect

import pytest
import torch

from optim_lab import load_optimizer

STEPS = 100
SHAPES = [(7,), (4, 5), (3, 2, 2), ()]
RTOL, ATOL = 1e-5, 1e-5  # float32; parameters are of order 1


def lab(name: str) -> type:
    try: return load_optimizer(name)
    except ValueError: pytest.skip(f'optim_lab.{name} is not registered yet')


def lab_factory(name: str, **hypers):
    cls = lab(name)
    missing = [k for k in hypers if k not in inspect.signature(cls.__init__).parameters]
    if missing: pytest.skip(f'optim_lab.{name} has no {missing}')
    return lambda ps: cls(ps, **hypers)


def run(factory, steps=STEPS, seed=0, noise=1.0, dtype=torch.float32):
    "All iterates of one optimizer over the parameters of `SHAPES`, fed g_t = theta_{t-1} + noise_t"
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]
    noises = [[noise * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    opt = factory(ps)
    history = [[p.detach().clone() for p in ps]]  # theta_0, then theta_1..theta_steps
    for t in range(steps):
        for p, xi in zip(ps, noises[t]): p.grad = (p.detach().double() + xi).to(dtype)
        opt.step()
        history.append([p.detach().clone() for p in ps])
    return history


def assert_same_trajectory(ours, theirs, what):
    for t, (a_t, b_t) in enumerate(zip(ours, theirs, strict=True)):
        for i, (a, b) in enumerate(zip(a_t, b_t, strict=True)):
            assert torch.isfinite(b).all(), f'{what}: the peer diverged at step {t}; choose a smaller lr'
            if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
                diff = (a.double() - b.double()).abs().max().item()
                pytest.fail(f'{what}: step {t}, param {i} (shape {SHAPES[i]}): max |diff| {diff:.3e}')


def compare(name, ours: dict, peer_cls, theirs: dict, what=''):
    history = run(lab_factory(name, **ours))
    peer = run(lambda ps: peer_cls(ps, **theirs))
    moved = max((a.double() - b.double()).abs().max().item() for a, b in zip(history[-1], history[0]))
    assert moved > 1e-2, f'{what}: parameters barely moved; the comparison would be vacuous'
    assert_same_trajectory(history, peer, what or f'{name}{ours} vs {peer_cls.__module__}.{peer_cls.__name__}{theirs}')


# %% SGD

SGD_SETTINGS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.5),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.9, weight_decay=0.1),
    dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.3),
    dict(lr=0.01, momentum=0.9, maximize=True),
    dict(lr=0.05, weight_decay=0.1, maximize=True),
]

@pytest.mark.parametrize('hypers', SGD_SETTINGS, ids=str)
def test_sgd_vs_torch(hypers):
    compare('SGD', hypers, torch.optim.SGD, hypers)


# %% Adam / AdamW

ADAM_SETTINGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.99)),
    dict(lr=3e-2, betas=(0.0, 0.9), eps=1e-3),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, amsgrad=True),
    dict(lr=1e-2, maximize=True),
    dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.2, amsgrad=True, maximize=True),
]

@pytest.mark.parametrize('hypers', ADAM_SETTINGS, ids=str)
def test_adam_vs_torch(hypers):
    compare('Adam', hypers, torch.optim.Adam, hypers)


def test_adam_decoupled_is_torch_adamw():
    compare('Adam', dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1))


ADAMW_SETTINGS = [
    dict(lr=1e-2),  # the default weight_decay: 1e-2 on both sides
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.5, amsgrad=True),
    dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, maximize=True),
]

@pytest.mark.parametrize('hypers', ADAMW_SETTINGS, ids=str)
def test_adamw_vs_torch(hypers):
    compare('AdamW', hypers, torch.optim.AdamW, hypers)


def test_adamw_default_weight_decay_matches_torch():
    assert lab('AdamW')([torch.zeros(1, requires_grad=True)]).defaults['weight_decay'] == \
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults['weight_decay']


# %% RAdam

RADAM_SETTINGS = [
    (dict(lr=1e-2), dict(lr=1e-2)),
    (dict(lr=1e-2, betas=(0.9, 0.99)), dict(lr=1e-2, betas=(0.9, 0.99))),
    (dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-4), dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-4)),
    (dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, weight_decay=0.1)),
    (dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True), dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    (dict(lr=1e-2, betas=(0.9, 0.95), maximize=True), dict(lr=1e-2, betas=(0.9, 0.95), maximize=True)),
]

@pytest.mark.parametrize('ours,theirs', RADAM_SETTINGS, ids=[str(o) for o, _ in RADAM_SETTINGS])
def test_radam_vs_torch(ours, theirs):
    compare('RAdam', ours, torch.optim.RAdam, theirs)


# %% pytorch-optimizer

po = pytest.importorskip('pytorch_optimizer')

# pytorch_optimizer.QHAdam with nus=(1, 1) is Adam: its averages are normalised by 1 + β + ... + β^(t-1),
# which is exactly the bias correction; L2 (weight_decouple=False) or AdamW-style decay (weight_decouple=True).
QHADAM_SETTINGS = [
    (dict(lr=1e-2), dict(lr=1e-2)),
    (dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True), dict(lr=1e-2, weight_decay=0.1, weight_decouple=True)),
    (dict(lr=1e-2, maximize=True), dict(lr=1e-2, maximize=True)),
]

@pytest.mark.parametrize('ours,theirs', QHADAM_SETTINGS, ids=[str(o) for o, _ in QHADAM_SETTINGS])
def test_adam_vs_pytorch_optimizer_qhadam(ours, theirs):
    compare('Adam', ours, po.QHAdam, dict(theirs, nus=(1.0, 1.0)))


# pytorch_optimizer.RAdam with degenerated_to_sgd=True takes torch's un-rectified step (lr * m_hat) while
# rho_t < 5, and folds sqrt(1 - beta2^t) into the rectifier, which is torch's update. Its L2 mode
# (weight_decouple=False) applies no decay at all, so only decoupled decay is compared.
PO_RADAM_SETTINGS = [
    (dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.0)),
    (dict(lr=1e-2, betas=(0.9, 0.99)), dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)),
    (dict(lr=1e-2, weight_decay=0.1, decoupled_wd=True), dict(lr=1e-2, weight_decay=0.1, weight_decouple=True)),
]

@pytest.mark.parametrize('ours,theirs', PO_RADAM_SETTINGS, ids=[str(o) for o, _ in PO_RADAM_SETTINGS])
def test_radam_vs_pytorch_optimizer(ours, theirs):
    compare('RAdam', ours, po.RAdam, dict(theirs, degenerated_to_sgd=True))


# %% The harness itself must be able to fail

def test_comparison_detects_a_different_optimizer():
    "A deliberately different configuration (another beta1) must not pass the tolerance"
    with pytest.raises(pytest.fail.Exception):
        compare('Adam', dict(lr=1e-2), torch.optim.Adam, dict(lr=1e-2, betas=(0.89, 0.999)))
