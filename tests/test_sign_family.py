"""Lion, SignSGD, Signum, LaProp, AdEMAMix and SimplifiedAdEMAMix (chapters 31-33) against their peers.

Both sides get the same parameters (several shapes, in one optimizer) and the same gradients
g_t = theta_{t-1} + noise_t for 100 steps, in float32, with identical explicit settings; every iterate must agree
to 1e-5. Where the peer deviates from the paper (pytorch-optimizer's LaProp weight decay, its SimplifiedAdEMAMix),
the comparison is against a float64 transcription of the equations instead, and the comment says why. Then the
properties the chapters state (Lion's step is a sign, Lion with beta1 = beta2 is Signum, SignSGD is Signum with momentum 0,
LaProp with beta1 = 0 is RMSprop, AdEMAMix and SimplifiedAdEMAMix reduce to Adam), and each optimizer's compiled step
against its eager step.
"""
from __future__ import annotations
import math

import pytest
import torch

from optim_lab import load_optimizer
import histories
from histories import deviation, assert_close_histories
from optim_lab.functional import calculate_lion_update

pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

SHAPES = [(7,), (4, 5), (3, 2, 2), ()]


def run(factory, shapes=SHAPES, **kwargs):
    "`histories.run` over this file's shapes, a 0-d tensor among them"
    return histories.run(factory, shapes=shapes, **kwargs)


def compare(name, ours: dict, peer_cls, theirs: dict):
    cls = load_optimizer(name)
    return assert_close_histories(run(lambda ps: cls(ps, **ours)), run(lambda ps: peer_cls(ps, **theirs)),
                                  f'{name}{ours} vs {peer_cls.__module__}.{peer_cls.__name__}{theirs}')


# %% Lion

LION_SETTINGS = [  # (ours, pytorch-optimizer's): decoupled decay is their `weight_decouple`
    (dict(lr=1e-2, betas=(0.9, 0.99)), dict(lr=1e-2, betas=(0.9, 0.99))),
    (dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5, decoupled_wd=True),
     dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5, weight_decouple=True)),
    (dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, decoupled_wd=False),
     dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, weight_decouple=False)),
    (dict(lr=1e-2, maximize=True), dict(lr=1e-2, maximize=True)),
]

@pytest.mark.parametrize('ours,theirs', LION_SETTINGS, ids=str)
def test_lion_vs_pytorch_optimizer(ours, theirs):
    compare('Lion', ours, pytorch_optimizer.Lion, theirs)


@pytest.mark.parametrize('ours,theirs', [
    (dict(lr=1e-2, betas=(0.9, 0.99)), dict(lr=1e-2, betas=(0.9, 0.99))),
    # lion-pytorch's decay is always θ ← (1 - ηλ)θ: ours with decoupled_wd=True
    (dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5, decoupled_wd=True), dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5)),
], ids=str)
def test_lion_vs_lion_pytorch(ours, theirs):
    lion_pytorch = pytest.importorskip('lion_pytorch')
    compare('Lion', ours, lion_pytorch.Lion, theirs)


def test_lion_step_is_a_sign():
    "Before the learning rate, Lion's step is in {-1, 0, +1}: in the function, and in the class's iterates"
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(50, generator=gen)
    for _ in range(20):
        g = torch.randn(50, generator=gen)
        g[:5] = 0.0
        m[:5] = 0.0  # exact ties: sign 0
        u = calculate_lion_update(g, m, 0.9, 0.99)
        assert set(u.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert (u[:5] == 0).all()
    lr = 2.0 ** -7  # exact in binary, and the iterates stay exactly representable multiples of it
    history = run(lambda ps: load_optimizer('Lion')(ps, lr=lr), dtype=torch.float64, steps=30)
    for prev, cur in zip(history, history[1:]):
        for a, b in zip(prev, cur):
            steps = (a - b) / lr
            assert torch.allclose(steps, steps.round(), atol=1e-9) and steps.round().abs().max() <= 1


@pytest.mark.parametrize('beta,weight_decay', [(0.5, 0.0), (0.9, 0.1), (0.99, 0.5)])
def test_lion_with_equal_betas_is_signum(beta, weight_decay):
    "With beta1 = beta2, Lion's direction c_t is the new momentum m_t, so Lion is Signum; float64, to rounding (a differing sign would cost 2 lr)"
    lion, signum = load_optimizer('Lion'), load_optimizer('Signum')
    ours = run(lambda ps: lion(ps, lr=1e-2, betas=(beta, beta), weight_decay=weight_decay), dtype=torch.float64)
    theirs = run(lambda ps: signum(ps, lr=1e-2, momentum=beta, weight_decay=weight_decay), dtype=torch.float64)
    assert deviation(ours, theirs) < 1e-12
    control = run(lambda ps: lion(ps, lr=1e-2, betas=(beta, 0.999), weight_decay=weight_decay), dtype=torch.float64)
    assert deviation(control, theirs) >= 2e-2 - 1e-12


# %% SignSGD and Signum

@pytest.mark.parametrize('ours,theirs', [
    (dict(lr=1e-2), dict(lr=1e-2, momentum=0.0)),
    (dict(lr=1e-2, weight_decay=0.3, decoupled_wd=True), dict(lr=1e-2, momentum=0.0, weight_decay=0.3, weight_decouple=True)),
    (dict(lr=1e-2, weight_decay=0.3, decoupled_wd=False, maximize=True),
     dict(lr=1e-2, momentum=0.0, weight_decay=0.3, weight_decouple=False, maximize=True)),
], ids=str)
def test_signsgd_vs_pytorch_optimizer(ours, theirs):
    compare('SignSGD', ours, pytorch_optimizer.SignSGD, theirs)


@pytest.mark.parametrize('ours,theirs', [
    (dict(lr=1e-2, momentum=0.9), dict(lr=1e-2, momentum=0.9)),
    (dict(lr=5e-3, momentum=0.5, weight_decay=0.2, decoupled_wd=True),
     dict(lr=5e-3, momentum=0.5, weight_decay=0.2, weight_decouple=True)),
    (dict(lr=1e-2, momentum=0.95, weight_decay=0.1, decoupled_wd=False),
     dict(lr=1e-2, momentum=0.95, weight_decay=0.1, weight_decouple=False)),
], ids=str)
def test_signum_vs_pytorch_optimizer(ours, theirs):
    compare('Signum', ours, pytorch_optimizer.SignSGD, theirs)


def test_signsgd_is_signum_with_momentum_0():
    signsgd, signum = load_optimizer('SignSGD'), load_optimizer('Signum')
    assert deviation(run(lambda ps: signsgd(ps, lr=1e-2)), run(lambda ps: signum(ps, lr=1e-2, momentum=0.0))) == 0.0


def signum_reference(theta, grads, lr, momentum, weight_decay, decoupled_wd, nesterov, shape_scaling):
    "Signum's equations in float64: the iterates"
    m, out = torch.zeros_like(theta), []
    for t, g in enumerate(grads, 1):
        if decoupled_wd: theta = (1 - lr * weight_decay) * theta
        else: g = g + weight_decay * theta
        m = momentum * m + (1 - momentum) * g
        if nesterov: m_hat = momentum * m / (1 - momentum ** (t + 1)) + (1 - momentum) * g / (1 - momentum ** t)
        else: m_hat = m / (1 - momentum ** t)
        u = torch.sign(m_hat)
        if shape_scaling and u.dim() == 2: u = u * 2 / (u.shape[0] + u.shape[1])
        theta = theta - lr * u
        out.append(theta)
    return out


@pytest.mark.parametrize('hypers', [
    dict(lr=1e-2, momentum=0.9, weight_decay=0.1, decoupled_wd=True, nesterov=True, shape_scaling=False),
    dict(lr=1e-2, momentum=0.8, weight_decay=0.1, decoupled_wd=False, nesterov=False, shape_scaling=True),
    dict(lr=1e-2, momentum=0.9, weight_decay=0.0, decoupled_wd=True, nesterov=True, shape_scaling=True),
], ids=str)
def test_signum_nesterov_and_shape_scaling_vs_float64_reference(hypers):
    "No peer has these options: the class, in float64, against the equations"
    gen = torch.Generator().manual_seed(1)
    for shape in [(4, 5), (7,)]:
        theta0 = torch.randn(shape, generator=gen, dtype=torch.float64)
        noise = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(60)]
        p = theta0.clone().requires_grad_()
        opt = load_optimizer('Signum')([p], **hypers)
        ours, grads, theta = [], [], theta0.clone()
        for xi in noise:  # the gradient depends on the iterate: feed both sides the same sequence
            g = p.detach() + xi
            grads.append(g)
            p.grad = g.clone()
            opt.step()
            ours.append(p.detach().clone())
        ref = signum_reference(theta, grads, **hypers)
        dev = max((a - b).abs().max().item() for a, b in zip(ours, ref))
        assert dev < 1e-12, (shape, dev)


# %% LaProp

@pytest.mark.parametrize('ours,theirs', [
    # pytorch-optimizer's decay is broken (see laprop_reference): compared without decay
    (dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0), dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-15)),
    (dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.0), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8)),
    (dict(lr=1e-2, betas=(0.95, 0.9), maximize=True), dict(lr=1e-2, betas=(0.95, 0.9), eps=1e-15, maximize=True)),
], ids=str)
def test_laprop_vs_pytorch_optimizer(ours, theirs):
    # Their denominator is (sqrt(v + 1e-15) + eps) / sqrt(1 - β2^t), ours sqrt(v_hat) + eps (the paper's): the
    # difference is of order eps, far below the tolerance for these eps.
    compare('LaProp', ours, pytorch_optimizer.LaProp, theirs)


def laprop_reference(theta, grads, lr, betas, eps, weight_decay, decoupled_wd):
    """LaProp's equations in float64 (the paper's Algorithm 1, with the base's decay). pytorch-optimizer 4.1 applies its
    decay after the step, to the parameter *and* to the gradient it has already used: L2 decay has no effect, and
    decoupled decay multiplies the updated weights instead of the previous ones, so it is compared with this instead"""
    (b1, b2), m, v, out = betas, torch.zeros_like(theta), torch.zeros_like(theta), []
    for t, g in enumerate(grads, 1):
        if decoupled_wd: theta = (1 - lr * weight_decay) * theta
        else: g = g + weight_decay * theta
        v = b2 * v + (1 - b2) * g * g
        g_prime = g / (torch.sqrt(v / (1 - b2 ** t)) + eps)
        m = b1 * m + (1 - b1) * g_prime
        theta = theta - lr * m / (1 - b1 ** t)
        out.append(theta)
    return out


def reference_run(cls_name, reference, hypers, steps=80, shapes=((4, 5), (7,)), dtype=torch.float64, seed=2):
    "Largest deviation between the class (in `dtype`) and `reference` (float64), fed the same gradients"
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        theta0 = torch.randn(shape, generator=gen, dtype=torch.float64)
        noise = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
        p = theta0.to(dtype, copy=True).requires_grad_()
        opt = load_optimizer(cls_name)([p], **hypers)
        ours, grads = [], []
        for xi in noise:
            g = p.detach().double() + xi
            grads.append(g)
            p.grad = g.to(dtype)
            opt.step()
            ours.append(p.detach().double().clone())
        ref = reference(theta0.clone(), [g.to(dtype).double() for g in grads], **hypers)
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(ours, ref)))
        assert (ours[-1] - theta0).abs().max() > 1e-2
    return worst


@pytest.mark.parametrize('hypers', [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.1, decoupled_wd=True),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1, decoupled_wd=False),
], ids=str)
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=['float64', 'float32'])
def test_laprop_weight_decay_vs_float64_reference(hypers, dtype, tol):
    assert reference_run('LaProp', laprop_reference, hypers, dtype=dtype) < tol


def test_laprop_beta1_0_is_rmsprop_with_bias_corrected_v():
    "β1 = 0: the update is g / (sqrt(v / (1 - β2^t)) + ε), which is torch.optim.Adam with β1 = 0"
    ours = run(lambda ps: load_optimizer('LaProp')(ps, lr=1e-2, betas=(0.0, 0.99), eps=1e-8))
    adam = run(lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.0, 0.99), eps=1e-8))
    assert_close_histories(ours, adam, 'LaProp(β1=0) vs torch.optim.Adam(β1=0)')
    def rmsprop_bias_corrected(theta, grads, lr, betas, eps, **_):
        v, out = torch.zeros_like(theta), []
        for t, g in enumerate(grads, 1):
            v = betas[1] * v + (1 - betas[1]) * g * g
            theta = theta - lr * g / (torch.sqrt(v / (1 - betas[1] ** t)) + eps)
            out.append(theta)
        return out
    assert reference_run('LaProp', rmsprop_bias_corrected, dict(lr=1e-2, betas=(0.0, 0.99), eps=1e-8)) < 1e-12


# %% AdEMAMix

ADEMAMIX_SETTINGS = [
    (dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha_beta3=None, eps=1e-8, decoupled_wd=False),
     dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha_beta3=None, eps=1e-8)),
    (dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=2.0, t_alpha_beta3=30, weight_decay=0.1, decoupled_wd=True),
     dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=2.0, t_alpha_beta3=30, weight_decay=0.1, weight_decouple=True)),
    (dict(lr=5e-3, betas=(0.8, 0.999, 0.995), alpha=8.0, t_alpha_beta3=150, weight_decay=0.05, decoupled_wd=False, maximize=True),
     dict(lr=5e-3, betas=(0.8, 0.999, 0.995), alpha=8.0, t_alpha_beta3=150, weight_decay=0.05, weight_decouple=False, maximize=True)),
]

@pytest.mark.parametrize('ours,theirs', ADEMAMIX_SETTINGS, ids=str)
def test_ademamix_vs_pytorch_optimizer(ours, theirs):
    compare('AdEMAMix', ours, pytorch_optimizer.AdEMAMix, theirs)


@pytest.mark.parametrize('hypers', [dict(betas=(0.9, 0.999, 0.9999)), dict(betas=(0.8, 0.99, 0.999), t_alpha_beta3=20,
                                                                                weight_decay=0.1)], ids=str)
def test_ademamix_with_alpha_0_is_adam(hypers):
    b1, b2, _ = hypers['betas']
    wd = hypers.get('weight_decay', 0.0)
    ours = run(lambda ps: load_optimizer('AdEMAMix')(ps, lr=1e-2, alpha=0.0, eps=1e-8, **hypers))
    adam = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(b1, b2), eps=1e-8, weight_decay=wd))
    assert_close_histories(ours, adam, f'AdEMAMix(alpha=0, {hypers}) vs torch.optim.AdamW')


# %% SimplifiedAdEMAMix

def sim_ademamix_reference(theta, grads, lr, betas, alpha, beta1_warmup, min_beta1, eps, weight_decay, decoupled_wd):
    """Simplified AdEMAMix's equations in float64 (Morwani et al. 2025, as emerging-optimizers documents them).
    pytorch-optimizer 4.1's SimplifiedAdEMAMix keeps m as an average (lerp) and never bias-corrects it, and divides by
    sqrt(1 - β2^t) where the bias correction multiplies (chapter 33 shows both), so it is not a reference"""
    (b_end, b2), m, v, out = betas, torch.zeros_like(theta), torch.zeros_like(theta), []
    for t, g in enumerate(grads, 1):
        if decoupled_wd: theta = (1 - lr * weight_decay) * theta
        else: g = g + weight_decay * theta
        b = b_end
        if beta1_warmup is not None and t < beta1_warmup:
            a = t / beta1_warmup
            b = math.exp(math.log(min_beta1) * math.log(b_end) / ((1 - a) * math.log(b_end) + a * math.log(min_beta1)))
        m = b * m + g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / ((1 - b ** t) / (1 - b))
        v_hat = v / (1 - b2 ** t)
        theta = theta - lr * (alpha * g + m_hat) / (torch.sqrt(v_hat) + eps)
        out.append(theta)
    return out


SIM_SETTINGS = [
    dict(lr=1e-2, betas=(0.99, 0.95), alpha=0.0, beta1_warmup=None, min_beta1=0.9, eps=1e-8, weight_decay=0.0, decoupled_wd=True),
    dict(lr=5e-3, betas=(0.995, 0.999), alpha=2.0, beta1_warmup=40, min_beta1=0.9, eps=1e-8, weight_decay=0.1, decoupled_wd=True),
    dict(lr=1e-2, betas=(0.98, 0.99), alpha=1.0, beta1_warmup=100, min_beta1=0.5, eps=1e-6, weight_decay=0.05, decoupled_wd=False),
]

@pytest.mark.parametrize('hypers', SIM_SETTINGS, ids=str)
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=['float64', 'float32'])
def test_sim_ademamix_vs_float64_reference(hypers, dtype, tol):
    assert reference_run('SimplifiedAdEMAMix', sim_ademamix_reference, hypers, dtype=dtype) < tol


def test_sim_ademamix_alpha_0_beta_0_9_is_adam():
    ours = run(lambda ps: load_optimizer('SimplifiedAdEMAMix')(ps, lr=1e-2, betas=(0.9, 0.999), alpha=0.0))
    adam = run(lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.999)))
    assert_close_histories(ours, adam, 'SimplifiedAdEMAMix(alpha=0) vs torch.optim.Adam')


# %% torch.compile: each optimizer's compiled step against its eager step

COMPILE_SETTINGS = {
    'Lion': dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    'SignSGD': dict(lr=1e-2, weight_decay=0.1, decoupled_wd=False),
    'Signum': dict(lr=1e-2, momentum=0.9, nesterov=True, shape_scaling=True, weight_decay=0.1),
    'LaProp': dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1),
    'AdEMAMix': dict(lr=1e-2, t_alpha_beta3=10, weight_decay=0.1),
    'SimplifiedAdEMAMix': dict(lr=1e-2, alpha=1.0, beta1_warmup=10, weight_decay=0.1),
}

@pytest.mark.parametrize('name', list(COMPILE_SETTINGS))
def test_compiled_step_matches_eager(name):
    "20 steps from one start on a weight, a bias and a conv kernel, with an lr schedule: compiled == eager to 1e-5 relative"
    cls = load_optimizer(name)
    shapes = [(8, 6), (6,), (4, 3, 3, 3)]
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    compiled, eager = cls(ps, compile=True, **COMPILE_SETTINGS[name]), cls(qs, **COMPILE_SETTINGS[name])
    for t in range(20):
        for opt in (compiled, eager): opt.param_groups[0]['lr'] = COMPILE_SETTINGS[name]['lr'] / (1 + 0.1 * t)
        for p, q in zip(ps, qs):
            g = p.detach() + torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        compiled.step(), eager.step()
    for p, q in zip(ps, qs):
        rel = ((p - q).abs().max() / q.abs().max()).item()
        assert rel < 1e-5, f'{name}: compiled vs eager, relative deviation {rel:.2e}'
