"""The contract every registered optimizer keeps.

Parametrized over `optim_lab.list_optimizers()`, so an optimizer added by a new chapter is covered
without touching this file. Per-optimizer knobs (toy learning rate, extra hyperparameters) are in conftest.py.
"""
from __future__ import annotations
import copy, io, math
from pathlib import Path

import pytest
import torch
from torch import nn

from optim_lab import load_optimizer, list_optimizers
from optim_lab.core import LabOptimizer, Range, OneOf
from optim_lab.registry import normalize_name

from conftest import (ALL, LR0_GROUP_HYPERS, NO_FASTAI_MOM, backward, CROSS_PARAM, TOY_STEPS, ToyMLP, accepts, closure_for, loss_of, make_opt, opt_class,
                      state_tensors, toy_data, toy_loss, toy_lr, train)

REPO = Path(__file__).resolve().parents[1]


def params_of(model): return [p.detach().clone() for p in model.parameters()]
def named_params(model): return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_all_equal(a, b, what=''):
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and torch.equal(x, y), f'{what} tensor {i} differs: max |diff| {(x.double() - y.double()).abs().max().item():.3e}'


# %% The class is a proper LabOptimizer

def test_registered_class_is_a_lab_optimizer(name):
    cls = opt_class(name)
    assert issubclass(cls, LabOptimizer)
    assert cls.__name__ == name
    assert '_' not in name, f'{name}: class names are CamelCase without underscores'


def test_every_hyperparameter_has_a_constraint(name):
    "Every hyperparameter in the defaults is validated (else a bad value could slip through silently)"
    opt = make_opt(name, [torch.zeros(2, requires_grad=True)])
    unchecked = set(opt.defaults) - set(opt_class(name).all_constraints())
    assert not unchecked, f'{name}: hyperparameters without a constraint: {sorted(unchecked)}'


def test_state_is_lazy(name):
    "No state before the first step; then state only for the parameters that had a gradient"
    model = ToyMLP()
    x, y = toy_data()
    opt = make_opt(name, model.parameters())
    assert len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values()), f'{name}: state created in __init__'
    train(opt, model, x, y, 2)
    with_state = {id(p) for p, s in opt.state.items() if len(s)}
    assert id(model.l1.weight) in with_state and id(model.unused) not in with_state


# %% Training

def test_loss_falls(name):
    x, y = toy_data()
    model = ToyMLP()
    opt = make_opt(name, model.parameters())
    initial = loss_of(model, x, y)
    train(opt, model, x, y, TOY_STEPS)
    final = loss_of(model, x, y)
    assert math.isfinite(final), f'{name}: loss became {final}'
    assert final < 0.5 * initial, f'{name} (lr={toy_lr(name)}): loss {initial:.4f} -> {final:.4f} in {TOY_STEPS} steps'


def test_maximize_ascends(name):
    cls = opt_class(name)
    if not accepts(cls, 'maximize'): pytest.skip(f'{name} has no `maximize`')
    x, y = toy_data()
    model = ToyMLP()
    opt = make_opt(name, model.parameters(), maximize=True)
    initial = loss_of(model, x, y)
    train(opt, model, x, y, TOY_STEPS, sign=-1.0)  # maximize -loss
    final = loss_of(model, x, y)
    assert math.isfinite(final) and final < 0.5 * initial, f'{name}: maximizing -loss took loss {initial:.4f} -> {final:.4f}'


def test_bf16_params_train(name):
    torch.manual_seed(0)
    x, y = toy_data(dtype=torch.bfloat16)
    model = ToyMLP().to(torch.bfloat16)
    opt = make_opt(name, model.parameters())
    initial = loss_of(model, x, y)
    train(opt, model, x, y, TOY_STEPS)
    final = loss_of(model, x, y)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert math.isfinite(final) and final < 0.5 * initial, f'{name}: bf16 loss {initial:.4f} -> {final:.4f}'
    floating = [(i, k, v.dtype) for i, k, v in state_tensors(opt) if v.is_floating_point()]
    wrong = [f for f in floating if f[2] != torch.float32]
    assert not wrong, f'{name}: state of bf16 params should be float32: {wrong}'


def test_fp16_params_run(name):
    torch.manual_seed(0)
    x, y = toy_data(dtype=torch.float16)
    model = ToyMLP().to(torch.float16)
    opt = make_opt(name, model.parameters())
    initial = loss_of(model, x, y)
    train(opt, model, x, y, 50)
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in model.parameters()), name
    assert all(torch.isfinite(v).all() for _, _, v in state_tensors(opt) if v.is_floating_point()), name
    assert loss_of(model, x, y) < initial, f'{name}: fp16 loss did not fall at all'


# %% State dict round trips

def _roundtrip_deepcopy(sd): return copy.deepcopy(sd)

def _roundtrip_torch_save(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _resume_variants(cls):
    variants = {'defaults': {}}
    momentum = dict(momentum=0.9) if accepts(cls, 'momentum') else {}  # SGD: stateful, and Nesterov needs it
    if accepts(cls, 'weight_decay'): variants['weight_decay'] = dict(weight_decay=0.05, **momentum)
    flags = {k: True for k, r in cls.all_constraints().items()
             if isinstance(r, OneOf) and set(r.values) == {False, True} and k != 'maximize' and accepts(cls, k)}
    if flags: variants['flags_on'] = dict(flags, **momentum)
    return variants


@pytest.mark.parametrize('roundtrip', [_roundtrip_deepcopy, _roundtrip_torch_save], ids=['deepcopy', 'torch.save'])
@pytest.mark.parametrize('variant', ['defaults', 'weight_decay', 'flags_on'])
def test_exact_resume(name, variant, roundtrip):
    "N steps, save, load into a fresh optimizer on a copy of the params, M steps == N+M steps, bit for bit"
    cls = opt_class(name)
    variants = _resume_variants(cls)
    if variant not in variants: pytest.skip(f'{name} has no {variant} variant')
    hypers = variants[variant]
    x, y = toy_data()
    N, M, batches = 7, 6, 4
    try: make_opt(name, [torch.zeros(1, requires_grad=True)], **hypers)
    except ValueError as e: pytest.skip(f'{name}: {hypers} is not a valid combination: {e}')

    torch.manual_seed(123)
    model_a = ToyMLP()
    opt_a = make_opt(name, model_a.parameters(), **hypers)
    train(opt_a, model_a, x, y, N + M, batches=batches)

    torch.manual_seed(123)
    model_b = ToyMLP()
    opt_b = make_opt(name, model_b.parameters(), **hypers)
    train(opt_b, model_b, x, y, N, batches=batches)
    saved = roundtrip(opt_b.state_dict())
    model_c = copy.deepcopy(model_b)
    del opt_b, model_b
    opt_c = make_opt(name, model_c.parameters(), **hypers)
    opt_c.load_state_dict(saved)
    # continue the same minibatch cycle: step N+t uses batch (N+t) % batches
    n = len(x) // batches
    for t in range(N, N + M):
        i = t % batches
        closure = closure_for(opt_c, model_c, x[i * n:(i + 1) * n], y[i * n:(i + 1) * n])
        if cls.needs_closure: opt_c.step(closure)
        else:
            closure()
            opt_c.step()

    assert_all_equal(params_of(model_a), params_of(model_c), f'{name} params')
    sa, sc = state_tensors(opt_a), state_tensors(opt_c)
    assert [(i, k) for i, k, _ in sa] == [(i, k) for i, k, _ in sc], f'{name}: state keys differ after resume'
    assert_all_equal([v for *_, v in sa], [v for *_, v in sc], f'{name} state')
    steps_a = {k: v for k, v in opt_a.state[model_a.l1.weight].items() if not isinstance(v, torch.Tensor)}
    steps_c = {k: v for k, v in opt_c.state[model_c.l1.weight].items() if not isinstance(v, torch.Tensor)}
    assert steps_a == steps_c, f'{name}: non-tensor state differs: {steps_a} vs {steps_c}'


def test_bf16_state_survives_roundtrip(name):
    "Loading a state dict must not round the fp32 state of bf16 params to bf16"
    x, y = toy_data(dtype=torch.bfloat16)
    model = ToyMLP().to(torch.bfloat16)
    opt = make_opt(name, model.parameters())
    train(opt, model, x, y, 3)
    saved = _roundtrip_torch_save(opt.state_dict())
    fresh = make_opt(name, copy.deepcopy(model).parameters())
    fresh.load_state_dict(saved)
    a, b = state_tensors(opt), state_tensors(fresh)
    assert [(i, k) for i, k, _ in a] == [(i, k) for i, k, _ in b]
    assert_all_equal([v for *_, v in a], [v for *_, v in b], f'{name} bf16 state after load')


# %% Hyperparameter validation

NAN = float('nan')

def _bad_values(rule, default):
    """(value, shown) pairs that `rule` must reject: `shown` is the part the error message must quote (the
    element, for a bad element of a tuple). `default` is a valid value, to fill a tuple's other positions"""
    if isinstance(rule, tuple):
        ok = tuple(default) if isinstance(default, (tuple, list)) and len(default) == len(rule) else (0.5,) * len(rule)
        bad = [(v, v) for v in (ok + ok[:1], ok[:-1])]  # one element too many, one too few
        for i, r in enumerate(rule):
            for v, shown in _bad_values(r, ok[i]): bad.append((ok[:i] + (v,) + ok[i + 1:], shown))
        return bad
    if isinstance(rule, OneOf):
        return [(v, v) for v in ('not-a-valid-choice', None) if v not in rule.values]
    assert isinstance(rule, Range), rule
    bad = [NAN, '0.1']
    if rule.lo > -math.inf:
        bad.append(float(rule.lo) - max(1.0, abs(rule.lo)))
        if rule.lo_open: bad.append(float(rule.lo))
    if rule.hi < math.inf:
        bad.append(float(rule.hi) + max(1.0, abs(rule.hi)))
        if rule.hi_open: bad.append(float(rule.hi))
    return [(v, v) for v in bad]


def _cases(name):
    cls = opt_class(name)
    defaults = make_opt(name, [torch.zeros(1, requires_grad=True)]).defaults
    for hp, rule in cls.all_constraints().items():
        for v, shown in _bad_values(rule, defaults.get(hp)): yield hp, v, shown


def _check_message(msg, name, hp, value, shown):
    shown = 'nan' if isinstance(shown, float) and math.isnan(shown) else repr(shown)
    problems = [w for w in (name, hp, shown) if w not in msg]
    return f'{hp}={value!r}: message {msg!r} lacks {problems}' if problems else None


def test_invalid_hyperparameters_rejected_by_constructor(name):
    cls = opt_class(name)
    failures, tested = [], 0
    for hp, value, shown in _cases(name):
        if not accepts(cls, hp): continue
        tested += 1
        try: make_opt(name, [torch.zeros(2, requires_grad=True)], **{hp: value})
        except ValueError as e:
            if (problem := _check_message(str(e), name, hp, value, shown)): failures.append(problem)
        except Exception as e: failures.append(f'{hp}={value!r}: {type(e).__name__} instead of ValueError: {e}')
        else: failures.append(f'{hp}={value!r} accepted')
    assert tested, f'{name}: no hyperparameter constraint applies to the constructor'
    assert not failures, f'{name}:\n' + '\n'.join(failures)


def test_invalid_hyperparameters_rejected_by_add_param_group(name):
    x, y = toy_data()
    model = ToyMLP()
    opt = make_opt(name, [model.l1.weight, model.l1.bias])
    train(opt, model, x, y, 2)
    groups_before = [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
    params_before = [list(g['params']) for g in opt.param_groups]
    state_before = [(i, k, v.clone()) for i, k, v in state_tensors(opt)]
    failures = []
    for hp, value, shown in _cases(name):
        try: opt.add_param_group({'params': [model.l2.weight], hp: value})
        except ValueError as e:
            if (problem := _check_message(str(e), name, hp, value, shown)): failures.append(problem)
        except Exception as e: failures.append(f'{hp}={value!r}: {type(e).__name__} instead of ValueError: {e}')
        else:
            failures.append(f'{hp}={value!r} accepted by add_param_group')
            del opt.param_groups[len(params_before):]
        if [list(g['params']) for g in opt.param_groups] != params_before:
            failures.append(f'{hp}={value!r}: param_groups changed')
            del opt.param_groups[len(params_before):]
    assert not failures, f'{name}:\n' + '\n'.join(failures)
    after = [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
    assert after == groups_before
    assert_all_equal([v for *_, v in state_before], [v for *_, v in state_tensors(opt)], f'{name} state')


def test_invalid_hyperparameters_set_later_rejected(name):
    """A bad value written into a param group after construction (fastai's set_hyper, a scheduler) is refused as
    it is written (the group keeps its old value); a group replaced by a plain dict is refused by the next step,
    before the closure runs or any parameter or state changes"""
    cls = opt_class(name)
    x, y = toy_data()
    failures, tested = [], 0
    for hp, value, shown in _cases(name):
        model = ToyMLP()
        opt = make_opt(name, model.parameters())
        if hp not in opt.param_groups[0]: continue
        tested += 1
        train(opt, model, x, y, 2)
        before, state_before = params_of(model), [(i, k, v.clone()) for i, k, v in state_tensors(opt)]
        old = opt.param_groups[0][hp]
        try: opt.param_groups[0][hp] = value
        except ValueError as e:
            if (problem := _check_message(str(e), name, hp, value, shown)): failures.append(problem)
            if opt.param_groups[0][hp] is not old: failures.append(f'{hp}={value!r}: the rejected value was kept')
        else: failures.append(f'{hp}={value!r} written into a param group was accepted')
        opt.param_groups[0] = {**opt.param_groups[0], hp: value}  # bypasses the check on write
        calls = []
        closure = closure_for(opt, model, x, y, record=calls)
        try:
            if not cls.needs_closure: closure()
            calls.clear()
            opt.step(closure)
        except ValueError as e:
            if (problem := _check_message(str(e), name, hp, value, shown)): failures.append(problem)
        except Exception as e: failures.append(f'{hp}={value!r}: {type(e).__name__} instead of ValueError: {e}')
        else: failures.append(f'{hp}={value!r} set on a param group was accepted by step')
        if calls: failures.append(f'{hp}={value!r}: the closure ran before the check')
        if not all(torch.equal(a, b) for a, b in zip(before, params_of(model))): failures.append(f'{hp}={value!r}: params changed')
        if not all(torch.equal(v, w) for (*_, v), (*_, w) in zip(state_before, state_tensors(opt), strict=True)):
            failures.append(f'{hp}={value!r}: state changed')
    assert tested, f'{name}: no hyperparameter in the param groups'
    assert not failures, f'{name}:\n' + '\n'.join(failures)


def test_add_param_group_after_steps(name):
    "A group added after some steps gets its own state and trains; the old params keep training"
    x, y = toy_data()
    model = ToyMLP()
    opt = make_opt(name, list(model.l1.parameters()) + [model.scale])
    train(opt, model, x, y, 3)
    before = params_of(model)
    opt.add_param_group({'params': list(model.l2.parameters())})
    train(opt, model, x, y, 3)
    after = params_of(model)
    names = [n for n, _ in model.named_parameters()]
    for n, b, a in zip(names, before, after):
        assert torch.isfinite(a).all(), f'{name}: {n} not finite'
        if n != 'unused': assert not torch.equal(a, b), f'{name}: {n} did not move'


# %% Parameters without gradients, groups, closures, sparse gradients

def test_params_without_grad_untouched(name):
    x, y = toy_data()
    model = ToyMLP()
    hypers = dict(weight_decay=0.1) if accepts(opt_class(name), 'weight_decay') else {}
    opt = make_opt(name, model.parameters(), **hypers)
    unused = model.unused.detach().clone()
    train(opt, model, x, y, 5)
    assert model.unused.grad is None
    assert torch.equal(model.unused.detach(), unused), f'{name} changed a parameter without a gradient'
    assert len(opt.state.get(model.unused, {})) == 0, f'{name} created state for a parameter without a gradient'


def test_step_leaves_grad_untouched(name):
    "The optimizer must not change the user's gradients (the original optimizer.ipynb's Adam_GCC centralised p.grad in place)"
    if opt_class(name).needs_closure: pytest.skip(f'{name} recomputes gradients through its closure')
    x, y = toy_data()
    model = ToyMLP()
    opt = make_opt(name, model.parameters())
    for _ in range(3):
        opt.zero_grad()
        backward(opt, toy_loss(model, x, y))
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        opt.step()
        assert_all_equal(grads, [p.grad for p in model.parameters() if p.grad is not None], f'{name} grads')


def test_two_param_groups(name):
    "The group with lr=0 does not move; the other group does"
    x, y = toy_data()
    model = ToyMLP()
    frozen = list(model.l1.parameters())
    opt = make_opt(name, [dict(params=frozen, lr=0.0, **LR0_GROUP_HYPERS.get(name, {})), dict(params=list(model.l2.parameters()) + [model.scale])])
    assert opt.param_groups[0]['lr'] == 0.0 and opt.param_groups[1]['lr'] == toy_lr(name)
    before = named_params(model)
    train(opt, model, x, y, 10)
    after = named_params(model)
    for n in ('l1.weight', 'l1.bias'): assert torch.equal(before[n], after[n]), f'{name}: {n} in the lr=0 group moved'
    for n in ('l2.weight', 'l2.bias', 'scale'):
        assert not torch.equal(before[n], after[n]), f'{name}: {n} in the lr>0 group did not move'
        assert torch.isfinite(after[n]).all()


def test_closure(name):
    "step(closure) returns the closure's loss, and the step uses the gradients that the closure computed"
    cls = opt_class(name)
    x, y = toy_data()
    model_a = ToyMLP()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = make_opt(name, model_a.parameters()), make_opt(name, model_b.parameters())
    for k in range(3):
        for p in model_a.parameters(): p.grad = torch.full_like(p, 1e3)  # stale garbage the closure must replace
        seen = []
        torch.manual_seed(k)  # the same random draws (AdaHessian's Rademacher vectors) for both optimizers
        loss = opt_a.step(closure_for(opt_a, model_a, x, y, record=seen))
        assert isinstance(loss, torch.Tensor) and torch.equal(loss.detach(), seen[0]), f'{name}: step returned {loss}, closure computed {seen}'
        if cls.needs_closure: continue
        assert len(seen) == 1, f'{name} called the closure {len(seen)} times'
        closure_for(opt_b, model_b, x, y)()
        torch.manual_seed(k)
        opt_b.step()
    if cls.needs_closure:
        assert all(torch.isfinite(p).all() for p in model_a.parameters())
        assert not torch.equal(model_a.l1.weight, model_b.l1.weight)
    else:
        assert_all_equal(params_of(model_a), params_of(model_b), f'{name} step(closure) vs backward(); step()')


def test_needs_closure_error(name):
    cls = opt_class(name)
    if not cls.needs_closure: pytest.skip(f'{name} does not need a closure')
    p = torch.ones(3, requires_grad=True)
    opt = make_opt(name, [p])
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match='closure'): opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_sparse_gradients_rejected(name):
    cls = opt_class(name)
    if cls.supports_sparse: pytest.skip(f'{name} supports sparse gradients')
    dense = nn.Parameter(torch.ones(4))
    emb = nn.Embedding(10, 3, sparse=True)
    opt = make_opt(name, [dense, emb.weight])
    before = [dense.detach().clone(), emb.weight.detach().clone()]
    def closure():
        dense.grad, emb.weight.grad = None, None
        loss = emb(torch.tensor([1, 4])).sum() + dense.sum()
        loss.backward()
        return loss
    with pytest.raises((RuntimeError, ValueError), match='(?i)sparse'):
        if cls.needs_closure: opt.step(closure)
        else:
            closure()
            opt.step()
    assert emb.weight.grad.is_sparse
    assert_all_equal(before, [dense.detach(), emb.weight.detach()], f'{name} after a refused sparse step')
    assert all(len(s) == 0 for s in opt.state.values()), f'{name} created state before refusing'


def test_param_trajectory_independent_of_other_params(name):
    """A parameter that gets its first gradient at step 4 follows the same path as in an optimizer of its own
    (per-parameter step counts and lazily created state; the seed used the group's first parameter's step)"""
    if name in CROSS_PARAM: pytest.skip(f'{name} couples parameters')
    if opt_class(name).needs_closure: pytest.skip(f'{name} needs a closure')
    gen = torch.Generator().manual_seed(0)
    p1, p2 = torch.randn(5, generator=gen).requires_grad_(), torch.randn(3, 2, generator=gen).requires_grad_()
    q2 = p2.detach().clone().requires_grad_()
    joint, alone = make_opt(name, [p1, p2]), make_opt(name, [q2])
    for t in range(12):
        p1.grad = p1.detach() + torch.randn(5, generator=gen)
        g2 = p2.detach() + torch.randn(3, 2, generator=gen)
        p2.grad = g2 if t >= 3 else None
        joint.step()
        if t >= 3:
            q2.grad = g2.clone()
            alone.step()
    assert torch.allclose(p2.detach(), q2.detach(), rtol=0, atol=1e-6), f'{name}: {p2.detach()} vs {q2.detach()}'


# %% Degenerate inputs

@pytest.mark.parametrize('case', ['zero_params_zero_grads', 'zero_params', 'zero_grads'])
def test_no_nan_on_zeros(name, case):
    "Zero gradients, zero parameters or zero momentum must never give NaN (many rules divide by norms)"
    if opt_class(name).needs_create_graph: pytest.skip(f'{name} needs gradients with a graph; its chapter covers zeros')
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (1,), ()]
    zero_p, zero_g = case != 'zero_grads', case != 'zero_params'
    ps = [(torch.zeros(s) if zero_p else torch.randn(s, generator=gen)).requires_grad_() for s in shapes]
    hypers = dict(weight_decay=0.1) if accepts(opt_class(name), 'weight_decay') else {}
    for hp in ({}, hypers):
        qs = [p.detach().clone().requires_grad_() for p in ps]
        opt = make_opt(name, qs, **hp)
        def closure():
            for q in qs: q.grad = torch.zeros_like(q) if zero_g else torch.randn(q.shape, generator=gen)
            return torch.tensor(0.0)
        for _ in range(5):
            if opt_class(name).needs_closure: opt.step(closure)
            else:
                closure()
                opt.step()
        assert all(torch.isfinite(q).all() for q in qs), f'{name} {hp} {case}: params {qs}'
        bad = [(i, k) for i, k, v in state_tensors(opt) if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f'{name} {hp} {case}: non-finite state {bad}'
        if case == 'zero_params_zero_grads' and not hp:
            assert all(torch.equal(q.detach(), torch.zeros_like(q)) for q in qs), f'{name} moved with zero gradients from zero'


# %% fastai hyperparameter map

def test_fastai_hypers_map_mom(name):
    cls = opt_class(name)
    fh = cls.fastai_hypers
    if name in NO_FASTAI_MOM: assert 'mom' not in fh.values(), f'{name} maps mom, but {NO_FASTAI_MOM[name]}'
    else: assert 'mom' in fh.values(), f'{name}.fastai_hypers has no mom: {fh}'
    assert len(set(fh.values())) == len(fh), f'{name}: two hyperparameters map to one fastai name: {fh}'
    defaults = make_opt(name, [torch.zeros(1, requires_grad=True)]).defaults
    for own, fa in fh.items():
        assert fa in ('lr', 'mom', 'sqr_mom', 'eps', 'wd'), f'{name}: {own} -> {fa} is not a fastai hyperparameter'
        key, _, idx = own.partition('__')
        assert key in defaults, f'{name}.fastai_hypers maps {own}, not in defaults {sorted(defaults)}'
        if idx:
            assert isinstance(defaults[key], (tuple, list)) and int(idx) < len(defaults[key]), (name, own, defaults[key])
        else: assert isinstance(defaults[key], (int, float)) and not isinstance(defaults[key], bool), (name, own, defaults[key])
    if 'betas' in defaults and 'betas__0' not in fh: pytest.fail(f'{name} has betas but does not map betas__0')


def test_fastai_wrapper_reads_mom(name):
    from optim_lab.fastai import opt_func
    if name in NO_FASTAI_MOM: pytest.skip(f'{name} maps no mom: {NO_FASTAI_MOM[name]}')
    model = ToyMLP()
    opt = opt_func(name)(list(model.parameters()), lr=toy_lr(name))
    own = next(k for k, v in opt_class(name).fastai_hypers.items() if v == 'mom')
    key, _, idx = own.partition('__')
    value = opt.opt.param_groups[0][key]
    expected = value[int(idx)] if idx else value
    assert opt.hypers[0]['mom'] == expected
    opt.set_hyper('mom', 0.5)
    value = opt.opt.param_groups[0][key]
    assert (value[int(idx)] if idx else value) == 0.5


# %% Registry

def test_registry_lookup_is_case_and_underscore_insensitive(name):
    cls = opt_class(name)
    assert load_optimizer(name.upper()) is cls
    assert load_optimizer(name.lower()) is cls
    assert load_optimizer(name[:1] + '_' + name[1:]) is cls
    assert load_optimizer('_'.join(name)) is cls


def test_registry_unknown_name_suggests(name):
    typo = name + 'q'
    if normalize_name(typo) in map(normalize_name, ALL): pytest.skip('typo is a real name')
    with pytest.raises(ValueError) as e: load_optimizer(typo)
    msg = str(e.value)
    assert repr(typo) in msg and 'closest' in msg, msg
    assert name in msg, f'{typo!r}: closest matches in {msg!r} omit {name}'


def test_registry_unknown_name_without_matches():
    with pytest.raises(ValueError, match='Unknown optimizer'): load_optimizer('zzzzzzzzzz')


def test_registry_info_and_notebook(name):
    info = opt_class(name).info
    assert info['name'] == name
    assert isinstance(info['paper'], str) and info['paper'].strip(), f'{name}: no paper/source'
    unpublished = any(w in info['paper'].lower() for w in ('optimizer.ipynb', 'unpublished'))
    if not (info['year'] is None and unpublished):  # the seed author's own rules have no publication year
        assert isinstance(info['year'], int) and 1950 <= info['year'] <= 2030, f'{name}: year {info["year"]!r}'
    assert info['chapter'], f'{name}: no chapter'
    assert (REPO / 'nbs' / f"{info['chapter']}.ipynb").exists(), f'{name}: nbs/{info["chapter"]}.ipynb missing'


def test_registry_list_is_sorted_and_complete():
    names = list_optimizers()
    assert names == sorted(names, key=str.lower)
    assert {'Adam', 'AdamW'} <= set(names)
    assert len(set(map(normalize_name, names))) == len(names)


# %% torch.compile

def _compile_available() -> str | None:
    "None if torch.compile works here, else the reason it does not"
    try:
        f = torch.compile(lambda a: a * 2 + 1, dynamic=True)
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    except Exception as e: return f'{type(e).__name__}: {e}'
    return None


def test_update_goes_through_update_fn(name):
    "The class runs its published math function (`update_fn`, the one the chapter derives and checks), not a copy"
    cls = opt_class(name)
    if cls.update_fn is None: pytest.skip(f'{name} has no update_fn')
    if cls.needs_create_graph: pytest.skip(f'{name} needs gradients with a graph')
    p = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = make_opt(name, [p])
    calls, rule = [], cls.update_fn
    opt.update_fn = lambda *a, **k: (calls.append(1), rule(*a, **k))[1]
    def closure():
        p.grad = p.detach() + 1.0
        return torch.tensor(0.0)
    for _ in range(2):
        closure()
        opt.step(closure)
    assert calls, f'{name}.update does not call self.update_fn'


# %% Non-finite gradients, create_optimizer, package attributes

def test_skip_nonfinite(name):
    "With skip_nonfinite=True a step with an inf/nan gradient changes nothing and is counted"
    if opt_class(name).needs_closure: pytest.skip(f'{name} needs a closure')
    x, y = toy_data()
    model = ToyMLP()
    opt = make_opt(name, model.parameters(), skip_nonfinite=True)
    train(opt, model, x, y, 2)
    before, state_before = params_of(model), [(i, k, v.clone()) for i, k, v in state_tensors(opt)]
    steps_before = {k: v for k, v in opt.state[model.l1.weight].items() if not isinstance(v, torch.Tensor)}
    for bad in (math.nan, math.inf):
        opt.zero_grad()
        backward(opt, toy_loss(model, x, y))
        model.l2.weight.grad[0, 0] = bad
        opt.step()
    assert_all_equal(before, params_of(model), f'{name} params after skipped steps')
    assert_all_equal([v for *_, v in state_before], [v for *_, v in state_tensors(opt)], f'{name} state after skipped steps')
    assert {k: v for k, v in opt.state[model.l1.weight].items() if not isinstance(v, torch.Tensor)} == steps_before
    assert opt.skipped_steps == 2
    fresh = make_opt(name, copy.deepcopy(model).parameters(), skip_nonfinite=True)
    fresh.load_state_dict(_roundtrip_torch_save(opt.state_dict()))
    assert fresh.skipped_steps == 2


def test_create_optimizer(name):
    from optim_lab import create_optimizer
    x, y = toy_data()
    model = ToyMLP()
    opt = create_optimizer(model, name, lr=toy_lr(name), weight_decay=0.01)
    assert isinstance(opt, opt_class(name))
    wds = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    assert wds[id(model.l1.weight)] == 0.01 and wds[id(model.l1.bias)] == 0.0
    train(opt, model, x, y, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_package_attribute(name):
    import optim_lab
    assert getattr(optim_lab, name) is opt_class(name)
