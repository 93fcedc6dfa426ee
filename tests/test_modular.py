"""The modular chain (`optim_lab.modular`, chapters 60-61): the equalities that prove the design (`[Adam, LR]` is
`optim_lab.Adam`, `[HeavyBall, Sign, LR]` is `optim_lab.Signum`, `Wrap(SGD)` is SGD), every first-order module against
torchzero 0.4 built from the same `(name, kwargs)` list (with per-group settings), torchzero's dims bug, against
torch.optim where torchzero claims equality, exact and plain `state_dict` resume, closures, lr schedulers and fastai."""
from __future__ import annotations
import copy
import math
import os
import warnings

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch
from torch import nn, Tensor

from optim_lab.modular import Modular, Module, m, modular_opt_func
from optim_lab.optimizers.adam import Adam as LabAdam
from optim_lab.optimizers.lion_signum import Lion as LabLion, Signum as LabSignum
from peer_versions import peer_is

tz = pytest.importorskip('torchzero')

# Tensors of different dims (1-D, 2-D, 3-D, 0-D): a module that reuses one tensor's dims for another would show it
SHAPES = ((5,), (4, 3), (2, 3, 2), ())
# The same number of dims (2-D) but different shapes: for torchzero's ClipNorm/Normalize/Centralize with dim=None,
# whose 0.4 release reuses the first tensor's dims for every later tensor (tested separately below)
SHAPES_2D = ((4, 3), (2, 5), (3, 3))
STEPS = 50


def make_params(shapes, seed=0, dtype=torch.float32) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def objective(ps: list[Tensor]) -> Tensor:
    "A smooth, non-quadratic loss that couples nothing: each tensor has its own scale"
    return sum(((p - 0.3) ** 2 * (i + 1)).sum() + 0.1 * (p ** 4).sum() for i, p in enumerate(ps))


def trajectory(make_opt, shapes=SHAPES, groups=None, steps=STEPS, seed=0) -> list[list[Tensor]]:
    "Every parameter after every step, for an optimizer built by `make_opt(params or groups)`"
    ps = make_params(shapes, seed)
    opt = make_opt(groups(ps) if groups else ps)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        objective(ps).backward()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def max_dev(a, b) -> float:
    return max((x - y).abs().max().item() for sa, sb in zip(a, b) for x, y in zip(sa, sb))


def chain(lib, spec):
    "Build the modules of `spec`, a list of (module name, kwargs), from `lib` (optim_lab's `m` or torchzero's `tz.m`)"
    return [getattr(lib, name)(**kwargs) for name, kwargs in spec]


# %% the equalities that prove the design

def test_adam_lr_is_optim_lab_adam_step_for_step():
    ours = trajectory(lambda ps: Modular(ps, m.Adam(), m.LR(1e-3)))
    ref = trajectory(lambda ps: LabAdam(ps, lr=1e-3))
    for t, (a, b) in enumerate(zip(ours, ref)):
        for x, y in zip(a, b): torch.testing.assert_close(x, y, rtol=0, atol=1e-7, msg=f'step {t + 1}')


def test_heavyball_sign_lr_is_signum():
    # Signum: m ← β m + (1 − β) g, step −η sign(m); heavy ball without lerp keeps m/(1 − β): the same sign
    ours = trajectory(lambda ps: Modular(ps, m.HeavyBall(momentum=0.9, ema_init='zeros'), m.Sign(), m.LR(1e-2)))
    ref = trajectory(lambda ps: LabSignum(ps, lr=1e-2, momentum=0.9))
    assert max_dev(ours, ref) <= 1e-6


@pytest.mark.parametrize('kwargs', [dict(lr=0.01, momentum=0.9), dict(lr=0.01, momentum=0.9, nesterov=True),
                                    dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=0.01)])
def test_wrap_sgd_is_sgd(kwargs):
    ours = trajectory(lambda ps: Modular(ps, m.Wrap(torch.optim.SGD, **kwargs)))
    ref = trajectory(lambda ps: torch.optim.SGD(ps, **kwargs))
    assert max_dev(ours, ref) == 0.0


def test_wrap_in_the_middle_passes_its_step_on():
    # Adam(lr=1) wrapped, then LR: the wrapped optimizer's step becomes the update, which LR scales
    ours = trajectory(lambda ps: Modular(ps, m.Wrap(torch.optim.Adam, lr=1.0), m.LR(1e-2)))
    ref = trajectory(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert max_dev(ours, ref) <= 1e-6


def test_lion_lr_is_optim_lab_lion():
    ours = trajectory(lambda ps: Modular(ps, m.Lion(beta1=0.8, beta2=0.95), m.LR(1e-2)))
    ref = trajectory(lambda ps: LabLion(ps, lr=1e-2, betas=(0.8, 0.95)))
    assert max_dev(ours, ref) == 0.0


@pytest.mark.parametrize('kw', [dict(precond_freq=3), dict(precond_freq=2, merge_small=True, max_dim=6, beta1=0.9),
                                dict(precondition_1d=False, shampoo_beta=None, debias=False)])
def test_soap_lr_is_optim_lab_soap(kw):
    soap = pytest.importorskip('optim_lab.optimizers.soap')
    names = dict(precond_freq='precondition_frequency', merge_small='merge_dims', max_dim='max_precondition_dim',
                 debias='correct_bias')
    theirs = dict(precondition_1d=True, shampoo_beta=0.95, max_precondition_dim=4096, precondition_frequency=10)
    theirs.update({names.get(k, k): v for k, v in kw.items() if k not in ('beta1', 'beta2')})
    ours = trajectory(lambda ps: Modular(ps, m.SOAP(**kw), m.LR(3e-2)))
    ref = trajectory(lambda ps: soap.SOAP(ps, lr=3e-2, weight_decay=0.0, betas=(kw.get('beta1', 0.95), 0.95), **theirs))
    assert max_dev(ours, ref) == 0.0
    assert max_dev(ours, [[p.detach() for p in make_params(SHAPES)]] * STEPS) > 1e-2


def test_tensorwise_chain_runs_per_parameter_with_the_same_result():
    "A chain of tensor-wise modules runs one parameter at a time; a non-tensor-wise module forces the batched path"
    seen = []
    class Probe(Module):
        tensorwise = True
        def step(self, var): seen.append(len(var.params)); return var
    class Global(Module):
        def step(self, var): seen.append(len(var.params)); return var
    spec = [('Adam', {}), ('HeavyBall', {}), ('Rprop', {}), LR_]
    per_param = trajectory(lambda ps: Modular(ps, Probe(), *chain(m, spec)), steps=5)
    assert set(seen) == {1}
    seen.clear()
    batched = trajectory(lambda ps: Modular(ps, Global(), *chain(m, spec)), steps=5)
    assert set(seen) == {len(SHAPES)}
    assert max_dev(per_param, batched) == 0.0


# %% against torchzero 0.4, both sides built from one list of (module name, kwargs)

LR_ = ('LR', dict(lr=1e-2))
TZ_CASES = {
    'Adam': [('Adam', {}), LR_],
    'Adam-amsgrad': [('Adam', dict(amsgrad=True, beta2=0.99)), LR_],
    'Adam-nodebias': [('Adam', dict(debias=False)), LR_],
    'Adam-alpha': [('Adam', dict(alpha=0.5)), LR_],
    'RMSprop': [('RMSprop', {}), LR_],
    'RMSprop-centered': [('RMSprop', dict(centered=True)), LR_],
    'RMSprop-debias-init': [('RMSprop', dict(debias=True, init='update')), LR_],
    'Lion': [('Lion', {}), LR_],
    'HeavyBall-Sign': [('HeavyBall', {}), ('Sign', {}), LR_],
    'ClipNorm-Adam': [('ClipNorm', dict(max_norm=1.0)), ('Adam', {}), LR_],
    'Adam-Cautious': [('Adam', {}), ('Cautious', {}), LR_],
    'Adam-Cautious-normalize': [('Adam', {}), ('Cautious', dict(normalize=True)), LR_],
    'Adam-Cautious-grad': [('Adam', {}), ('Cautious', dict(mode='grad')), LR_],
    'Adam-Cautious-backtrack': [('Adam', {}), ('Cautious', dict(mode='backtrack')), LR_],
    'Adagrad': [('Adagrad', {}), ('LR', dict(lr=0.1))],
    'Adagrad-decay': [('Adagrad', dict(lr_decay=0.01, initial_accumulator_value=0.1, alpha=2.0)), LR_],
    'Rprop': [('Rprop', {}), LR_],
    'Rprop-nobacktrack': [('Rprop', dict(backtrack=False, nplus=1.5, alpha=0.5)), LR_],
    'Sign': [('Sign', {}), LR_],
    'HeavyBall': [('HeavyBall', {}), ('LR', dict(lr=1e-3))],
    'HeavyBall-debias-dampening': [('HeavyBall', dict(debias=True, dampening=0.1)), ('LR', dict(lr=1e-3))],
    'EMA': [('EMA', {}), LR_],
    'EMA-debias-init': [('EMA', dict(debias=True, ema_init='update')), LR_],
    'NAG': [('NAG', {}), ('LR', dict(lr=1e-3))],
    'NAG-lerp-dampening': [('NAG', dict(lerp=True, dampening=0.2)), LR_],
    'ClipValue': [('ClipValue', dict(value=0.5)), LR_],
    'ClipNorm': [('ClipNorm', dict(max_norm=1.0)), LR_],
    'ClipNorm-dim0': [('ClipNorm', dict(max_norm=1.0, dim=0)), LR_],
    'ClipNorm-global': [('ClipNorm', dict(max_norm=1.0, dim='global')), LR_],
    'ClipNorm-ord1-inverse': [('ClipNorm', dict(max_norm=2.0, ord=1, dim=0, inverse_dims=True)), LR_],
    'Normalize': [('Normalize', {}), LR_],
    'Normalize-dim0': [('Normalize', dict(norm_value=0.5, dim=0)), LR_],
    'Normalize-global': [('Normalize', dict(dim='global')), LR_],
    'Centralize': [('Centralize', {}), LR_],
    'Centralize-dim0': [('Centralize', dict(dim=0)), LR_],
    'Centralize-gc': [('Centralize', dict(dim=0, inverse_dims=True)), LR_],
    'Centralize-global': [('Centralize', dict(dim='global')), LR_],
    'WeightDecay-Adam': [('WeightDecay', dict(weight_decay=0.1)), ('Adam', {}), LR_],
    'WeightDecay-L1': [('WeightDecay', dict(weight_decay=0.1, ord=1)), LR_],
    'Adam-WeightDecay-decoupled': [('Adam', {}), ('WeightDecay', dict(weight_decay=0.1)), LR_],
    'Lion-Cautious-ClipValue': [('Lion', {}), ('Cautious', {}), ('ClipValue', dict(value=0.5)), LR_],
    'Orthogonalize-svd': [('Orthogonalize', dict(method='svd')), LR_],
}
# 2-D tensors only: the cases that torchzero 0.4 computes with the first tensor's dims for every tensor (dim=None);
# and Orthogonalize, which flattens a conv kernel to (dim 0) × (the rest) as Muon does, where torchzero orthogonalizes
# each trailing-index slice of the first two dims separately
SAME_DIMS_ONLY = {'ClipNorm-Adam', 'ClipNorm', 'Normalize', 'Centralize', 'Orthogonalize-svd'}
# Per-group settings: the first tensor's group overrides a setting of the chain (and lr)
GROUP_OVERRIDES = {
    'Adam': dict(beta1=0.5, beta2=0.9, lr=0.05), 'Adam-amsgrad': dict(beta2=0.9), 'RMSprop': dict(smoothing=0.9),
    'RMSprop-centered': dict(smoothing=0.8, eps=1e-4), 'Lion': dict(beta1=0.5, beta2=0.9),
    'HeavyBall-Sign': dict(momentum=0.5), 'ClipNorm-Adam': dict(max_norm=0.1, beta1=0.5), 'ClipNorm': dict(max_norm=0.1), 'Adam-Cautious': dict(beta1=0.5),
    'Adagrad-decay': dict(lr_decay=0.1, eps=0.1), 'Rprop': dict(nplus=1.5, nminus=0.2, ub=0.5),
    'HeavyBall': dict(momentum=0.5, dampening=0.5), 'EMA': dict(momentum=0.5), 'NAG': dict(momentum=0.5),
    'ClipValue': dict(value=0.1), 'ClipNorm-dim0': dict(max_norm=0.1), 'Normalize-dim0': dict(norm_value=2.0),
    'WeightDecay-Adam': dict(weight_decay=0.0), 'Centralize-dim0': dict(lr=0.1),
}


def _agree(spec, shapes, groups=None):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # torchzero warns when a group key is a setting of several modules
        ours = trajectory(lambda ps: Modular(ps, *chain(m, spec)), shapes, groups)
        theirs = trajectory(lambda ps: tz.Optimizer(ps, *chain(tz.m, spec)), shapes, groups)
    moved = max_dev(ours, [[p.detach() for p in make_params(shapes)]] * STEPS)
    return max_dev(ours, theirs), moved


@pytest.mark.parametrize('case', list(TZ_CASES))
def test_agrees_with_torchzero(case):
    shapes = SHAPES_2D if case in SAME_DIMS_ONLY else SHAPES
    dev, moved = _agree(TZ_CASES[case], shapes)
    assert moved > 1e-3, 'the parameters hardly moved: the comparison would prove nothing'
    assert dev <= 1e-5, f'{case}: largest deviation from torchzero {dev:.2e} over {STEPS} steps'


@pytest.mark.parametrize('case', list(GROUP_OVERRIDES))
def test_agrees_with_torchzero_per_group(case):
    shapes = SHAPES_2D if case in SAME_DIMS_ONLY else SHAPES
    overrides = GROUP_OVERRIDES[case]
    groups = lambda ps: [{'params': ps[:1], **overrides}, {'params': ps[1:]}]
    dev, _ = _agree(TZ_CASES[case], shapes, groups)
    assert dev <= 1e-5, f'{case} with {overrides}: largest deviation from torchzero {dev:.2e}'
    plain = trajectory(lambda ps: Modular(ps, *chain(m, TZ_CASES[case])), shapes)
    grouped = trajectory(lambda ps: Modular(ps, *chain(m, TZ_CASES[case])), shapes, groups)
    assert max((a[0] - b[0]).abs().max().item() for a, b in zip(plain, grouped)) > 1e-6, 'the override changed nothing'
    assert all(torch.equal(x, y) for a, b in zip(plain, grouped) for x, y in zip(a[1:], b[1:])), 'it leaked to group 2'


def test_adam_eps_placement_differs_from_torchzero_as_documented():
    # ours is torch.optim.Adam's m̂/(√v̂ + ε); torchzero 0.4 computes (√(1-β2^t)/(1-β1^t))·m/(√v + ε): ε is not rescaled.
    # Invisible at ε = 1e-8, visible at a large ε; torch.optim.Adam agrees with ours
    spec = [('Adam', dict(eps=0.1)), LR_]
    if peer_is('torchzero'):
        dev, _ = _agree(spec, SHAPES)
        assert dev > 1e-4
    ours = trajectory(lambda ps: Modular(ps, *chain(m, spec)))
    ref = trajectory(lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=0.1))
    assert max_dev(ours, ref) <= 1e-6


def test_adam_alpha_without_debias_is_ignored_by_torchzero():
    # torchzero 0.4 multiplies by `alpha` only inside its debiasing branch; ours scales the direction either way
    if peer_is('torchzero'):
        theirs = {a: trajectory(lambda ps: tz.Optimizer(ps, tz.m.Adam(debias=False, alpha=a), tz.m.LR(1e-2))) for a in (1.0, 0.5)}
        assert max_dev(theirs[1.0], theirs[0.5]) == 0.0
    ours = trajectory(lambda ps: Modular(ps, m.Adam(debias=False, alpha=0.5), m.LR(1e-2)))
    half_lr = trajectory(lambda ps: Modular(ps, m.Adam(debias=False), m.LR(0.5e-2)))
    assert max_dev(ours, half_lr) <= 1e-6


# %% torchzero 0.4's dims bug: with dim=None, every tensor is reduced over the first tensor's dims

def _clip_ref(u, max_norm): n = u.norm(); return u * min(1.0, max_norm / n.item()) if n > 1e-12 else u
def _normalize_ref(u, value): n = u.norm(); return u * (value / n.item()) if n > 1e-12 else u
def _centralize_ref(u): return u - u.mean() if u.numel() >= 2 else u

@pytest.mark.parametrize('name, kwargs, ref', [('ClipNorm', dict(max_norm=1.0), lambda u: _clip_ref(u, 1.0)),
                                               ('Normalize', dict(norm_value=1.0), lambda u: _normalize_ref(u, 1.0)),
                                               ('Centralize', {}, _centralize_ref)])
def test_dim_none_is_per_tensor_unlike_torchzero(name, kwargs, ref):
    "One step from gradients g: ours transforms each whole tensor (float64 reference); torchzero uses the 1-D dims for the 2-D one"
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(5, generator=g, dtype=torch.float64) * 3, torch.randn(4, 3, generator=g, dtype=torch.float64) * 3]
    def step(lib, make):
        ps = [torch.zeros_like(x, requires_grad=True) for x in grads]
        for p, x in zip(ps, grads): p.grad = x.clone()
        make(lib, ps).step()
        return [-p.detach() for p in ps]
    ours = step(m, lambda lib, ps: Modular(ps, getattr(lib, name)(**kwargs), lib.LR(1.0)))
    theirs = step(tz.m, lambda lib, ps: tz.Optimizer(ps, getattr(lib, name)(**kwargs), lib.LR(1.0)))
    for u, x in zip(ours, grads): torch.testing.assert_close(u, ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theirs[0], ours[0])                  # the first tensor sets the dims: agrees
    if peer_is('torchzero'):
        assert (theirs[1] - ours[1]).abs().max() > 1e-2             # the 2-D one is reduced over dim 0 only


# %% against torch.optim, where torchzero says its module is identical

def test_rmsprop_centered_is_torch_rmsprop():
    ours = trajectory(lambda ps: Modular(ps, m.RMSprop(smoothing=0.9, centered=True), m.LR(1e-2)))
    ref = trajectory(lambda ps: torch.optim.RMSprop(ps, lr=1e-2, alpha=0.9, eps=1e-8, centered=True))
    assert max_dev(ours, ref) <= 1e-6


def test_adagrad_is_torch_adagrad():
    kw = dict(lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-10)
    ours = trajectory(lambda ps: Modular(ps, m.Adagrad(**kw), m.LR(0.1)))
    ref = trajectory(lambda ps: torch.optim.Adagrad(ps, lr=0.1, **kw))
    assert max_dev(ours, ref) <= 1e-6


def test_rprop_without_backtracking_is_torch_rprop():
    ours = trajectory(lambda ps: Modular(ps, m.Rprop(alpha=0.01, backtrack=False, nplus=1.2, nminus=0.5, lb=1e-6, ub=50)))
    ref = trajectory(lambda ps: torch.optim.Rprop(ps, lr=0.01, etas=(0.5, 1.2), step_sizes=(1e-6, 50)))
    assert max_dev(ours, ref) <= 1e-6


def test_orthogonalize_gives_near_orthogonal_updates():
    "Muon's quintic Newton–Schulz: singular values of the update in about [0.6, 1.3]; the SVD method exactly UVᵀ"
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(6, 10, generator=g, dtype=torch.float64)
    for method, lo, hi in (('newtonschulz', 0.6, 1.3), ('svd', 1 - 1e-9, 1 + 1e-9)):
        p = torch.zeros(6, 10, dtype=torch.float64, requires_grad=True)
        p.grad = grad.clone()
        Modular([p], m.Orthogonalize(method=method), m.LR(1.0)).step()
        s = torch.linalg.svdvals(-p.detach())
        assert lo <= s.min() and s.max() <= hi, (method, s)
    U, _, Vh = torch.linalg.svd(grad, full_matrices=False)
    torch.testing.assert_close(-p.detach(), U @ Vh)
    b = torch.zeros(7, requires_grad=True); b.grad = torch.randn(7)      # vectors pass through unchanged
    Modular([b], m.Orthogonalize(), m.LR(1.0)).step()
    torch.testing.assert_close(-b.detach(), b.grad)


# %% state_dict: exact resume, plain state

def _closure_for(ps, opt):
    def closure(backward=True):
        loss = objective(ps)
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    return closure


RESUME_CHAINS = {   # (module name, kwargs) lists; second-order chains that need a closure are added below if present
    'Adam-LR': [('Adam', {}), LR_],
    'momentum-zoo': [('ClipNorm', dict(max_norm=1.0)), ('HeavyBall', {}), ('Rprop', {}), ('Cautious', {}), LR_],
    'RMSprop-Adagrad': [('RMSprop', dict(centered=True, amsgrad=True)), ('Adagrad', {}), ('NAG', {}), LR_],
    'SOAP-Wrap': [('SOAP', dict(precond_freq=2)), ('Wrap', dict(opt_fn=torch.optim.Adam, lr=1.0)), LR_],
}
if hasattr(m, 'LBFGS') and hasattr(m, 'StrongWolfe'):
    RESUME_CHAINS['LBFGS-StrongWolfe'] = [('LBFGS', {}), ('StrongWolfe', {})]


def _plain_walk(x, where='state'):
    if isinstance(x, Tensor):
        assert not isinstance(x, nn.Parameter) and not x.requires_grad and x.grad_fn is None, where
        return [x]
    if isinstance(x, dict): return [t for k, v in x.items() for t in _plain_walk(v, f'{where}[{k!r}]')]
    if isinstance(x, (list, tuple)): return [t for i, v in enumerate(x) for t in _plain_walk(v, f'{where}[{i}]')]
    assert isinstance(x, (int, float, bool, str, type(None))), f'{where} is a {type(x).__name__}'
    return []


@pytest.mark.parametrize('case', list(RESUME_CHAINS))
def test_state_dict_resume_is_bit_identical(case):
    spec, k, more = RESUME_CHAINS[case], 7, 6
    dtype = torch.float64
    ps = make_params(SHAPES, dtype=dtype)
    opt = Modular(ps, *chain(m, spec))
    for _ in range(k): opt.step(_closure_for(ps, opt))
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in ps]
    for _ in range(more): opt.step(_closure_for(ps, opt))          # the uninterrupted run

    fresh = [p.clone().requires_grad_() for p in saved]
    opt2 = Modular(fresh, *chain(m, spec))
    opt2.load_state_dict(sd)
    for _ in range(more): opt2.step(_closure_for(fresh, opt2))
    for a, b in zip(ps, fresh): assert torch.equal(a, b), f'{case}: resumed run differs by {(a - b).abs().max():.2e}'
    assert any(not torch.equal(a, s) for a, s in zip(fresh, saved)), 'the loaded optimizer did not move'


def test_state_dict_is_plain_and_holds_no_parameters():
    ps = make_params(SHAPES)
    opt = Modular(ps, m.Adam(amsgrad=True), m.HeavyBall(), m.Rprop(), m.Wrap(torch.optim.Adam, lr=1.0), m.LR(1e-2))
    for _ in range(3): opt.step(_closure_for(ps, opt))
    sd = opt.state_dict()
    tensors = _plain_walk(sd['state']) + _plain_walk(sd['global_state'])
    assert len(tensors) >= 4 * len(ps)
    ptrs = {p.data_ptr() for p in ps}
    assert not any(t.data_ptr() in ptrs for t in tensors), 'state shares storage with a parameter'
    assert all(isinstance(i, int) for g in sd['param_groups'] for i in g['params'])
    assert set(sd['state'][0]) == {'0.Adam', '1.HeavyBall', '2.Rprop', '3.Wrap'}


def test_deepcopy_of_the_optimizer_keeps_its_chain():
    ps = make_params(SHAPES)
    opt = Modular(ps, m.Adam(), m.LR(1e-2))
    opt.step(_closure_for(ps, opt))
    twin = copy.deepcopy(opt)
    qs = [p for g in twin.param_groups for p in g['params']]
    assert twin.modules[0]._modular is twin and all(q is not p for q, p in zip(qs, ps))
    opt.step(_closure_for(ps, opt)); twin.step(_closure_for(qs, twin))
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


def test_load_refuses_a_different_chain():
    ps = make_params(SHAPES)
    opt = Modular(ps, m.Adam(), m.LR(1e-2))
    opt.step(_closure_for(ps, opt))
    with pytest.raises(ValueError, match='saved chain'):
        Modular(make_params(SHAPES), m.Lion(), m.LR(1e-2)).load_state_dict(opt.state_dict())


# %% bad settings are refused, naming the module, the setting, the value and the range, before anything changes

@pytest.mark.parametrize('make, match', [(lambda: m.Adam(beta1=1.5), r'Adam: beta1=1.5 is outside'),
                                         (lambda: m.LR(-1e-3), r'LR: lr=-0.001 is outside'),
                                         (lambda: m.Cautious(mode='sideways'), r"Cautious: mode='sideways'"),
                                         (lambda: m.RMSprop(smoothing=-0.1), r'RMSprop: smoothing=-0.1'),
                                         (lambda: m.Newton(h=1e-2), r'Newton: h=0.01 is not supported')])
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match): make()


def test_bad_group_override_raises_before_anything_changes():
    ps = make_params(SHAPES)
    with pytest.raises(ValueError, match=r'Adam: beta2=1.0 is outside the allowed range \[0, 1\)'):
        Modular([{'params': ps[:1], 'beta2': 1.0}, {'params': ps[1:]}], m.Adam(), m.LR(1e-2))
    opt = Modular(ps[1:], m.Adam(), m.LR(1e-2))
    with pytest.raises(ValueError, match='LR: lr=-1'): opt.add_param_group({'params': ps[:1], 'lr': -1})
    assert len(opt.param_groups) == 1


# %% closures, skipped parameters, schedulers

def test_step_returns_the_first_loss_and_counts_evaluations():
    ps = make_params(SHAPES)
    opt = Modular(ps, m.Adam(), m.LR(1e-2))
    calls = []
    def closure(backward=True):
        loss = objective(ps)
        calls.append(backward)
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    expected = objective(ps).item()
    assert opt.step(closure).item() == expected
    assert calls == [True] and opt.num_evaluations == 1


def test_loss_is_evaluated_once_and_again_only_for_a_gradient():
    class Probe(Module):
        def step(self, var):
            a, b = var.get_loss(backward=False), var.get_loss(backward=False)
            assert a is b
            var.get_grad(); var.get_grad()
            return var
    ps = make_params(SHAPES)
    opt = Modular(ps, Probe(), m.LR(0.0))
    calls = []
    def closure(backward=True):
        calls.append(backward)
        loss = objective(ps)
        if backward: opt.zero_grad(); loss.backward()
        return loss
    opt.step(closure)
    assert calls == [False, True]


def test_module_needing_a_closure_says_so():
    class NeedsLoss(Module):
        def step(self, var): var.get_loss(backward=False); return var
    p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)
    with pytest.raises(ValueError, match='needs a closure'): Modular([p], NeedsLoss()).step()


def test_params_without_grad_are_untouched():
    ps = make_params(SHAPES)
    opt = Modular(ps, m.HeavyBall(), m.Adam(), m.LR(1e-2))
    before = ps[1].detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (ps[0] ** 2).sum().backward()                       # only ps[0] gets a gradient
        opt.step()
    assert ps[1].grad is None and torch.equal(ps[1].detach(), before) and not opt.state[ps[1]]
    assert not torch.equal(ps[0].detach(), make_params(SHAPES)[0].detach())


@pytest.mark.parametrize('make_sched', [lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
                                        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS, cycle_momentum=False)])
def test_lr_scheduler_drives_lr(make_sched):
    def run(make_opt):
        ps = make_params(SHAPES)
        opt = make_opt(ps)
        sched, out = make_sched(opt), []
        for _ in range(STEPS):
            opt.zero_grad(); objective(ps).backward(); opt.step(); sched.step()
            out.append([p.detach().clone() for p in ps])
        return out, opt.param_groups[0]['lr']
    (ours, lr_ours), (ref, lr_ref) = run(lambda ps: Modular(ps, m.Adam(), m.LR(1e-2))), run(lambda ps: LabAdam(ps, lr=1e-2))
    assert lr_ours == lr_ref != 1e-2
    assert max_dev(ours, ref) <= 1e-7


def test_modular_takes_a_module_and_named_parameters():
    net = nn.Linear(3, 2)
    for params in (net, net.named_parameters()):
        opt = Modular(params, m.Adam(), m.LR(1e-2))
        assert [p for g in opt.param_groups for p in g['params']] == list(net.parameters())
        assert opt.param_groups[0]['lr'] == 1e-2


# %% fastai

def test_fastai_fit_one_cycle_schedules_lr_and_beta1(tmp_path):
    pytest.importorskip('fastai')
    from fastai.callback.schedule import combined_cos
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from optim_lab.fastai import digits_dls, HyperRecorder
    from optim_lab.problems import digits_cnn
    torch.manual_seed(0)
    rec, lr = HyperRecorder(), 3e-3
    learn = Learner(digits_dls(), digits_cnn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=rec,
                    opt_func=modular_opt_func(m.Adam(), m.LR(1e-3)))
    with learn.no_bar(), learn.no_logging():
        before = learn.validate()[0]
        learn.fit_one_cycle(1, lr)
    valid_loss, acc = learn.recorder.values[-1][1:]
    assert valid_loss < 0.5 * before and acc > 0.8, (before, valid_loss, acc)
    assert isinstance(learn.opt.opt, Modular)
    n = len(rec.hps['lr'])
    pcts = [i / n for i in range(n)]
    rec.assert_follows('lr', [combined_cos(0.25, lr / 25, lr, lr / 1e5)(p) for p in pcts], tol=1e-9)
    rec.assert_follows('beta1', [combined_cos(0.25, 0.95, 0.85, 0.95)(p) for p in pcts], tol=1e-9)

    # Learner.save/load with the optimizer: a fresh Learner gets the chain's state back exactly
    learn.path = tmp_path
    learn.save('chain', with_opt=True)
    fresh = Learner(digits_dls(), digits_cnn(), loss_func=nn.CrossEntropyLoss(), path=tmp_path,
                    opt_func=modular_opt_func(m.Adam(), m.LR(1e-3)))
    fresh.load('chain', with_opt=True)
    pairs = list(zip(learn.model.parameters(), fresh.model.parameters()))
    assert all(torch.equal(a, b) for a, b in pairs)
    for a, b in pairs:
        sa, sb = learn.opt.opt.state[a]['0.Adam'], fresh.opt.opt.state[b]['0.Adam']
        assert sa['step'] == sb['step'] > 0 and torch.equal(sa['exp_avg'], sb['exp_avg'])


# %% maximize and skip_nonfinite (LabOptimizer's keywords; torchzero 0.4.4's Optimizer has neither)

def concave(ps: list[Tensor]) -> Tensor:
    "A smooth concave function of several tensors, maximum near 1 (a) and -0.5 (b): what maximize=True climbs"
    a, b = ps
    return -(2 * (a - 1).pow(2).sum() + ((b + 0.5).pow(2) * torch.arange(1.0, 4.0, dtype=b.dtype)).sum()) \
        + 0.1 * a.sin().sum() - 0.05 * (a ** 4).sum()


def climb(make_opt, sign=1.0, steps=12, style='tz', dtype=torch.float64):
    """Parameters and p.grad after each step of an optimizer on sign·concave; style 'tz': closure(backward),
    'torch': torch.optim's closure(), 'none': backward by the caller, then step()"""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(2, 2, generator=g, dtype=dtype).requires_grad_(), torch.randn(3, generator=g, dtype=dtype).requires_grad_()]
    opt, out, losses = make_opt(ps), [], []
    def closure(backward=True):
        loss = sign * concave(ps)
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    for _ in range(steps):
        if style == 'none':
            closure(True)
            opt.step()
        else:
            loss = opt.step(closure if style == 'tz' else lambda: closure(True))
            losses.append(loss.item())
        out.append(([p.detach().clone() for p in ps], [None if p.grad is None else p.grad.clone() for p in ps]))
    return out, losses


MAXIMIZE_CHAINS = {
    'Adam-LR': lambda: (m.Adam(), m.LR(0.05)),
    'ClipNorm-Adam-LR': lambda: (m.ClipNorm(1.0), m.Adam(), m.LR(0.05)),
    'LBFGS-StrongWolfe': lambda: (m.LBFGS(), m.StrongWolfe()),
    'Backtracking': lambda: (m.HeavyBall(0.5), m.Backtracking()),
    'Newton': lambda: (m.Newton(),),
    'TrustCG-Newton': lambda: (m.TrustCG(m.Newton()),),
}


@pytest.mark.parametrize('style', ['tz', 'torch', 'none'])
@pytest.mark.parametrize('name', list(MAXIMIZE_CHAINS))
def test_maximize_f_is_minimising_minus_f_step_for_step(name, style):
    "maximize=True on f against the same chain on -f (the reference: no maximize code runs there): bit-equal"
    if style == 'none' and name not in ('Adam-LR', 'ClipNorm-Adam-LR'): pytest.skip('this chain needs a closure')
    if style == 'torch' and 'Newton' in name: pytest.skip("a Newton module needs the closure's backward argument")
    mods = MAXIMIZE_CHAINS[name]
    up, f_up = climb(lambda ps: Modular(ps, *mods(), maximize=True), style=style)
    down, f_down = climb(lambda ps: Modular(ps, *mods()), sign=-1.0, style=style)
    for t, ((pu, gu), (pd, gd)) in enumerate(zip(up, down)):
        assert all(torch.equal(x, y) for x, y in zip(pu, pd)), f'{name}: step {t + 1}'
        # the caller's p.grad is the gradient of f after a maximizing step (the chain negated it only inside the step)
        assert all(x is y is None or torch.equal(x, -y) for x, y in zip(gu, gd)), f'{name}: p.grad after step {t + 1}'
    assert f_up == [-x for x in f_down]                       # step(closure) returns the closure's own f
    if style != 'none': assert f_up[-1] > f_up[0]             # it climbed


@pytest.mark.parametrize('style', ['tz', 'none'])
def test_maximize_against_torch_optim(style):
    "[Adam, LR] and [HeavyBall, LR] ascending, against torch.optim's own maximize=True, float64"
    for ours, ref in [(lambda ps: Modular(ps, m.Adam(beta2=0.99), m.LR(0.05), maximize=True),
                       lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.9, 0.99), maximize=True)),
                      (lambda ps: Modular(ps, m.HeavyBall(momentum=0.9, ema_init='zeros'), m.LR(0.01), maximize=True),
                       lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, maximize=True))]:
        a, _ = climb(ours, style=style, steps=30)
        b, _ = climb(ref, style=style, steps=30)
        for (pa, _), (pb, _) in zip(a, b):
            for x, y in zip(pa, pb): torch.testing.assert_close(x, y, rtol=0, atol=1e-12)   # float64 rounding of the same sums


def test_maximize_and_skip_nonfinite_are_checked():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match='maximize=1 is outside the allowed range'): Modular([p], m.LR(0.1), maximize=1)
    with pytest.raises(ValueError, match="skip_nonfinite='yes' is outside"): Modular([p], m.LR(0.1), skip_nonfinite='yes')
    with pytest.raises(ValueError, match='maximize is a setting of the whole chain'):
        Modular([{'params': [p], 'maximize': True}], m.LR(0.1))
    opt = Modular([p], m.LR(0.1))
    assert not opt.maximize and not opt.skip_nonfinite and opt.skipped_steps == 0


def same(x, y) -> bool:
    "Bit-equal tensors, equal numbers, in the same nesting of dicts and lists"
    if isinstance(x, Tensor): return isinstance(y, Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict): return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)): return len(x) == len(y) and all(map(same, x, y))
    return x == y


class Blowup(Module):
    "A module that makes the update inf on one entry at a chosen step (a finite gradient, a non-finite update)"
    tensorwise = True
    def __init__(self, at: int): super().__init__(dict(at=at))
    def step(self, var):
        if var.modular.current_step == self.defaults['at']: var.get_update()[-1].view(-1)[0] = math.inf
        return var


SKIP_CHAINS = {
    'Adam-LR': lambda: (m.Adam(), m.LR(0.1)),                        # tensor-wise: the chain runs one parameter at a time
    'ClipNorm-Adam-LR': lambda: (m.ClipNorm(1.0), m.Adam(), m.LR(0.1)),  # a global module: all parameters at once
    'Adam-Blowup-LR': lambda: (m.Adam(), Blowup(at=3), m.LR(0.1)),
    'LBFGS-Backtracking': lambda: (m.LBFGS(), m.Backtracking()),     # the line search moves the parameters itself
}


def skip_run(mods, steps, plant=None, closure=False):
    """Parameters after `steps` (a list of step ids) of `Modular(..., skip_nonfinite=True)` on a gradient field; at step
    `plant` a nan goes into one gradient entry. Checks, independently of the chain's snapshot, that the planted step left
    the parameters and everything state_dict holds bit-equal. Returns the parameters and the optimizer"""
    g0 = torch.Generator().manual_seed(1)
    ps = [torch.randn(3, 2, generator=g0, dtype=torch.float64).requires_grad_(),
          torch.randn(5, generator=g0, dtype=torch.float64).requires_grad_()]
    opt = Modular(ps, *mods(), skip_nonfinite=True)
    for i in steps:
        def grads():
            gs = [torch.sin(p.detach() * 0.7 + j + 0.1 * i) + p.detach() for j, p in enumerate(ps)]   # roughly a quadratic's
            if i == plant: gs[1][2] = math.nan
            return gs
        def loss_closure(backward=True):   # the loss a line search compares: half the squared norm; the gradient: grads()
            gs = grads()
            loss = sum((p.detach() ** 2).sum() / 2 for p in ps)
            if backward:
                for p, g in zip(ps, gs): p.grad = g.clone()
            return loss
        before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
        if closure: opt.step(loss_closure)
        else:
            for p, g in zip(ps, grads()): p.grad = g
            opt.step()
        if i == plant:
            after = opt.state_dict()
            assert all(torch.equal(a, p) for a, p in zip(before[1], ps)), 'parameters moved'
            assert all(same(before[0][k], after[k]) for k in ('state', 'global_state', 'current_step')), 'state changed'
    return torch.cat([p.detach().flatten() for p in ps]), opt


@pytest.mark.parametrize('name', ['Adam-LR', 'ClipNorm-Adam-LR'])
def test_skip_nonfinite_planted_nan_gradient(name):
    "A nan gradient: parameters and module state (Adam's moments) bit-equal across it; the run then equals one without it"
    planted, opt = skip_run(SKIP_CHAINS[name], [0, 1, 2, 99, 3, 4], plant=99)
    clean, ref = skip_run(SKIP_CHAINS[name], [0, 1, 2, 3, 4])
    assert torch.equal(planted, clean) and opt.skipped_steps == 1 and ref.skipped_steps == 0
    assert opt.current_step == ref.current_step == 5
    fresh = Modular([torch.zeros(3, 2, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)], *SKIP_CHAINS[name]())
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.skipped_steps == 1                           # the count survives a checkpoint, as LabOptimizer's does
    # the first step skipped: no state is created at all
    _, first = skip_run(SKIP_CHAINS[name], [99], plant=99)
    assert not any(first.state.values()) and first.skipped_steps == 1


def test_skip_nonfinite_nonfinite_update_from_finite_gradient():
    "Blowup makes the update inf at step 3 (from a finite gradient): Adam's moments, already updated, are put back"
    g0 = torch.Generator().manual_seed(1)
    ps = [torch.randn(3, 2, generator=g0).requires_grad_(), torch.randn(5, generator=g0).requires_grad_()]
    opt = Modular(ps, m.Adam(), Blowup(at=3), m.LR(0.1), skip_nonfinite=True)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    ref_opt = torch.optim.Adam(ref, lr=0.1)     # an independent Adam that never sees the skipped step
    for i in range(6):
        for p, r in zip(ps, ref): p.grad = torch.cos(p.detach() + i); r.grad = torch.cos(r.detach() + i)
        saved, values = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
        opt.step()
        if i == 3:
            assert opt.skipped_steps == 1 and all(torch.equal(v, p) for v, p in zip(values, ps))
            assert same(saved['state'], opt.state_dict()['state'])
            opt.modules[1].defaults['at'] = -1   # no more blow-ups; step 3's gradient is dropped from the reference too
            continue
        ref_opt.step()
    for p, r in zip(ps, ref): torch.testing.assert_close(p, r, rtol=0, atol=1e-6)   # float32 rounding of the same Adam


def test_skip_nonfinite_line_search_global_state_put_back():
    """LBFGS + Backtracking with a closure (the line search moves the parameters itself): a nan gradient at step 3 has
    already changed L-BFGS's history (its global state) when the check runs; it is put back, so the run goes on as one
    without that step (the parameters a tensor-wise chain has already moved are put back in the tests above)"""
    planted, opt = skip_run(SKIP_CHAINS['LBFGS-Backtracking'], [0, 1, 99, 2, 3], plant=99, closure=True)
    clean, ref = skip_run(SKIP_CHAINS['LBFGS-Backtracking'], [0, 1, 2, 3], closure=True)
    assert torch.equal(planted, clean) and opt.skipped_steps == 1
    assert opt.num_evaluations > ref.num_evaluations           # the skipped step's evaluations are counted
