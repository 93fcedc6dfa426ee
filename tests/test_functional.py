"""`optim_lab.functional` (chapter 30) against float64 transcriptions of emerging-optimizers' documented equations.

Each function runs 40 steps on random gradients beside a plain transcription (new tensors on every line, the warm-up
schedules in their documented form); the update it returns and the buffers it updates in place must agree to 1e-12.
Also: the exact signatures, `grad` never modified, a new tensor returned, and tracing under torch.compile.
"""
from __future__ import annotations
import inspect, itertools, math

import pytest
import torch

from optim_lab.functional import (calculate_adam_update, calculate_ademamix_update, calculate_laprop_update,
                                  calculate_lion_update, calculate_signum_update, calculate_sim_ademamix_update,
                                  half_life_warmup, linear_warmup)


# %% float64 transcriptions of the equations

def debias(beta, t, correct_bias): return 1 - beta ** t if correct_bias else 1.0

def nesterov(m, g, beta, t, correct_bias):
    if correct_bias: return beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
    return beta * m + (1 - beta) * g

def adam_ref(g, bufs, t, betas=(0.9, 0.999), correct_bias=True, use_nesterov=False, eps=1e-8):
    (m, v), (b1, b2) = bufs, betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = nesterov(m, g, b1, t, correct_bias) if use_nesterov else m / debias(b1, t, correct_bias)
    v_hat = v / debias(b2, t, correct_bias)
    return [m, v], m_hat / (torch.sqrt(v_hat) + eps)

def lion_ref(g, bufs, t, momentum_beta=0.9, momentum_beta2=None):
    (m,), b1 = bufs, momentum_beta
    b2 = b1 if momentum_beta2 is None else momentum_beta2
    c = b1 * m + (1 - b1) * g
    m = b2 * m + (1 - b2) * g
    return [m], torch.sign(c)

def signum_ref(g, bufs, t, momentum_beta=0.9, correct_bias=True, use_nesterov=False, use_shape_scaling=False):
    (m,), b = bufs, momentum_beta
    m = b * m + (1 - b) * g
    m_hat = nesterov(m, g, b, t, correct_bias) if use_nesterov else m / debias(b, t, correct_bias)
    u = torch.sign(m_hat)
    if use_shape_scaling and u.dim() == 2: u = u * 2 / (u.shape[0] + u.shape[1])
    return [m], u

def laprop_ref(g, bufs, t, correct_bias=True, betas=(0.9, 0.999), eps=1e-8):
    (m, v), (b1, b2) = bufs, betas
    v = b2 * v + (1 - b2) * g * g
    v_hat = v / debias(b2, t, correct_bias)
    g_prime = g / (torch.sqrt(v_hat) + eps)
    m = b1 * m + (1 - b1) * g_prime
    return [m, v], m / debias(b1, t, correct_bias)

def warmed_beta(t, b_start, b_end, T):
    if T is None or t >= T: return b_end
    return math.exp(math.log(b_start) * math.log(b_end) / ((1 - t / T) * math.log(b_end) + (t / T) * math.log(b_start)))

def ademamix_ref(g, bufs, t, num_beta_slow_warmup_steps=None, num_alpha_warmup_steps=None,
                 betas=(0.9, 0.999, 0.9999), eps=1e-8, correct_bias=True, alpha=2):
    (m_fast, m_slow, v), (b_fast, b2, b_slow) = bufs, betas
    b_slow_t = warmed_beta(t, b_fast, b_slow, num_beta_slow_warmup_steps)
    alpha_t = alpha if num_alpha_warmup_steps is None else alpha * min(1, t / num_alpha_warmup_steps)
    m_fast = b_fast * m_fast + (1 - b_fast) * g
    m_slow = b_slow_t * m_slow + (1 - b_slow_t) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat_fast = m_fast / debias(b_fast, t, correct_bias)
    v_hat = v / debias(b2, t, correct_bias)
    return [m_fast, m_slow, v], (m_hat_fast + alpha_t * m_slow) / (torch.sqrt(v_hat) + eps)

def sim_ademamix_ref(g, bufs, t, num_beta_fast_warmup_steps=None, min_beta_fast=0.9, betas=(0.99, 0.999),
                     eps=1e-8, correct_bias=True, alpha=2):
    (m, v), (b_fast, b2) = bufs, betas
    b = warmed_beta(t, min_beta_fast, b_fast, num_beta_fast_warmup_steps)
    m = b * m + g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / ((1 - b ** t) / (1 - b)) if correct_bias else m
    v_hat = v / debias(b2, t, correct_bias)
    return [m, v], (alpha * g + m_hat) / (torch.sqrt(v_hat) + eps)


# %% the harness

def rule_check(fn, reference, n_buffers, steps=40, shape=(5, 4), seed=0, **hypers) -> float:
    "Largest deviation between `fn(g, *buffers, **hypers, step=t)` and `reference`, in the update and the buffers"
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.zeros(shape, dtype=torch.float64) for _ in range(n_buffers)]
    theirs = [b.clone() for b in ours]
    takes_step = 'step' in inspect.signature(fn).parameters
    worst = 0.0
    for t in range(1, steps + 1):
        g = 0.3 + torch.randn(shape, generator=gen, dtype=torch.float64)
        g0 = g.clone()
        u = fn(g, *ours, **hypers, **(dict(step=t) if takes_step else {}))
        assert torch.equal(g, g0), f'{fn.__name__} modified grad'
        assert all(u.data_ptr() != x.data_ptr() for x in (g, *ours)), f'{fn.__name__} returned one of its inputs'
        theirs, expected = reference(g, theirs, t, **hypers)
        worst = max(worst, (u - expected).abs().max().item(), *((a - b).abs().max().item() for a, b in zip(ours, theirs)))
    return worst


# %% every function, over a grid of settings

def grid(**axes):
    "Every combination of the given values"
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]

CASES = (
    [(calculate_adam_update, adam_ref, 2, h) for h in grid(betas=[(0.9, 0.999), (0.5, 0.9)], correct_bias=[True, False],
                                                           use_nesterov=[True, False], eps=[1e-8, 1e-3])]
    + [(calculate_lion_update, lion_ref, 1, h) for h in grid(momentum_beta=[0.9, 0.0, 0.99], momentum_beta2=[None, 0.99, 0.5])]
    + [(calculate_signum_update, signum_ref, 1, h) for h in grid(momentum_beta=[0.9, 0.0, 0.5], correct_bias=[True, False],
                                                                 use_nesterov=[True, False], use_shape_scaling=[True, False])]
    + [(calculate_laprop_update, laprop_ref, 2, h) for h in grid(correct_bias=[True, False], betas=[(0.9, 0.999), (0.0, 0.99), (0.99, 0.9)],
                                                                 eps=[1e-15, 1e-3])]
    + [(calculate_ademamix_update, ademamix_ref, 3, h) for h in grid(
        num_beta_slow_warmup_steps=[None, 25, 60], num_alpha_warmup_steps=[None, 10],
        betas=[(0.9, 0.999, 0.9999), (0.8, 0.99, 0.95)], eps=[1e-8], correct_bias=[True, False], alpha=[2, 0.0, 7.5])]
    + [(calculate_sim_ademamix_update, sim_ademamix_ref, 2, h) for h in grid(
        num_beta_fast_warmup_steps=[None, 20, 100], min_beta_fast=[0.9, 0.5], betas=[(0.99, 0.999), (0.9, 0.95)],
        eps=[1e-8], correct_bias=[True, False], alpha=[2, 0.0])]
)

@pytest.mark.parametrize('fn,reference,n_buffers,hypers', CASES, ids=[f'{c[0].__name__}-{c[3]}' for c in CASES])
def test_function_vs_float64_transcription(fn, reference, n_buffers, hypers):
    for shape in [(5, 4), (7,), (2, 3, 2)]:
        dev = rule_check(fn, reference, n_buffers, shape=shape, **hypers)
        assert dev < 1e-12, f'{fn.__name__}{hypers} {shape}: {dev:.3e}'


def test_largest_deviations(capsys):
    "The largest deviation of each function over all the settings above (printed with `pytest -s`)"
    worst = {}
    for fn, reference, n_buffers, hypers in CASES:
        worst[fn.__name__] = max(worst.get(fn.__name__, 0.0), rule_check(fn, reference, n_buffers, **hypers))
    with capsys.disabled():
        for name, dev in worst.items(): print(f'\n{name}: largest deviation from its float64 transcription {dev:.2e}', end='')
    assert max(worst.values()) < 1e-12


# %% the API

SIGNATURES = {
    calculate_adam_update: 'grad, exp_avg, exp_avg_sq, betas, correct_bias, use_nesterov, step, eps',
    calculate_ademamix_update: 'grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, num_beta_slow_warmup_steps, '
                               'num_alpha_warmup_steps, betas, step, eps, correct_bias, alpha=2',
    calculate_laprop_update: 'grad, exp_avg, exp_avg_sq, correct_bias, betas, step, eps',
    calculate_lion_update: 'grad, exp_avg, momentum_beta, momentum_beta2=None',
    calculate_signum_update: 'grad, exp_avg, momentum_beta, correct_bias, use_nesterov, step, use_shape_scaling=False',
    calculate_sim_ademamix_update: 'grad, exp_avg, exp_avg_sq, num_beta_fast_warmup_steps, min_beta_fast, betas, step, '
                                   'eps, correct_bias, alpha=2',
}

@pytest.mark.parametrize('fn', list(SIGNATURES), ids=lambda f: f.__name__)
def test_signature_is_emerging_optimizers(fn):
    params = inspect.signature(fn).parameters.values()
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    assert ', '.join(p.name + ('' if p.default is p.empty else f'={p.default}') for p in params) == SIGNATURES[fn]


def test_keyword_calls_as_in_emerging_optimizers():
    "A call written for emerging-optimizers, all by keyword, in float32"
    g = torch.randn(3, 4)
    kw = dict(grad=g, exp_avg=torch.zeros(3, 4), exp_avg_sq=torch.zeros(3, 4))
    u = calculate_adam_update(**kw, betas=(0.9, 0.999), correct_bias=True, use_nesterov=False, step=1, eps=1e-8)
    torch.testing.assert_close(u, g / (g.abs() + 1e-8))
    u = calculate_sim_ademamix_update(**dict(kw, exp_avg=torch.zeros(3, 4), exp_avg_sq=torch.zeros(3, 4)),
                                      num_beta_fast_warmup_steps=None, min_beta_fast=0.9, betas=(0.99, 0.999), step=1,
                                      eps=1e-8, correct_bias=True)
    torch.testing.assert_close(u, 3 * g / (g.abs() + 1e-8))  # (α g + g) / |g| with α = 2
    u = calculate_ademamix_update(grad=g, exp_avg_fast=torch.zeros(3, 4), exp_avg_slow=torch.zeros(3, 4),
                                  exp_avg_sq=torch.zeros(3, 4), num_beta_slow_warmup_steps=None, num_alpha_warmup_steps=None,
                                  betas=(0.9, 0.999, 0.9999), step=1, eps=1e-8, correct_bias=True)
    torch.testing.assert_close(u, (1 + 2 * 1e-4) * g / (g.abs() + 1e-8))  # m_slow = (1 - β_slow) g, uncorrected
    u = calculate_lion_update(grad=g, exp_avg=torch.zeros(3, 4), momentum_beta=0.9)
    assert torch.equal(u, g.sign())
    u = calculate_signum_update(grad=g, exp_avg=torch.zeros(3, 4), momentum_beta=0.9, correct_bias=True, use_nesterov=False,
                                step=1, use_shape_scaling=True)
    assert torch.equal(u, g.sign() * 2 / 7)
    u = calculate_laprop_update(grad=g, exp_avg=torch.zeros(3, 4), exp_avg_sq=torch.zeros(3, 4), correct_bias=True,
                                betas=(0.9, 0.999), step=1, eps=0.0)
    torch.testing.assert_close(u, g.sign())


def test_warmup_schedules():
    half_life = lambda b: math.log(0.5) / math.log(b)
    for t in range(0, 100, 7):  # the half-life grows linearly from that of beta_start to that of beta_end
        expected = half_life(0.9) + t / 100 * (half_life(0.9999) - half_life(0.9))
        assert math.isclose(half_life(half_life_warmup(t, 0.9, 0.9999, 100)), expected, rel_tol=1e-9)
    assert half_life_warmup(100, 0.9, 0.9999, 100) == 0.9999 and half_life_warmup(10**6, 0.9, 0.9999, 100) == 0.9999
    assert half_life_warmup(0, 0.0, 0.9, 10) == 0.0 and math.isclose(half_life_warmup(5, 0.0, 0.9, 10), 0.81)
    assert half_life_warmup(1, 0.5, 0.9, 0) == 0.9 and linear_warmup(1, 3.0, 0) == 3.0  # T < 1: no warm-up
    assert [linear_warmup(t, 2.0, 4) for t in (1, 2, 4, 8)] == [0.5, 1.0, 2.0, 2.0]
    # the same numbers as 0-d tensors (the compiled path)
    for t in (0, 3, 9, 10, 50):
        tt = torch.tensor(float(t), dtype=torch.float64)
        b = half_life_warmup(tt, torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.99, dtype=torch.float64),
                             torch.tensor(10.0, dtype=torch.float64))
        assert math.isclose(b.item(), half_life_warmup(t, 0.5, 0.99, 10), rel_tol=1e-14)
    zero = half_life_warmup(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.9), torch.tensor(10.0))
    assert zero.item() == 0.0


# %% torch.compile

def _tensors(hypers):
    "Numbers as float64 0-d tensors (tuples element-wise), as the classes' compiled steps see them"
    def t(v):
        if isinstance(v, tuple): return tuple(t(x) for x in v)
        if isinstance(v, (int, float)) and not isinstance(v, bool): return torch.tensor(float(v), dtype=torch.float64)
        return v
    return {k: t(v) for k, v in hypers.items()}

COMPILE_CASES = [
    (calculate_adam_update, 2, dict(betas=(0.9, 0.999), correct_bias=True, use_nesterov=True, eps=1e-8)),
    (calculate_lion_update, 1, dict(momentum_beta=0.9, momentum_beta2=0.99)),
    (calculate_signum_update, 1, dict(momentum_beta=0.9, correct_bias=True, use_nesterov=True, use_shape_scaling=True)),
    (calculate_laprop_update, 2, dict(correct_bias=True, betas=(0.9, 0.999), eps=1e-15)),
    (calculate_ademamix_update, 3, dict(num_beta_slow_warmup_steps=5, num_alpha_warmup_steps=3, betas=(0.9, 0.999, 0.9999),
                                        eps=1e-8, correct_bias=True, alpha=5.0)),
    (calculate_sim_ademamix_update, 2, dict(num_beta_fast_warmup_steps=5, min_beta_fast=0.9, betas=(0.99, 0.95), eps=1e-8,
                                            correct_bias=False, alpha=2.0)),
]

@pytest.mark.parametrize('fn,n_buffers,hypers', COMPILE_CASES, ids=[c[0].__name__ for c in COMPILE_CASES])
def test_traces_with_tensor_step_and_hypers(fn, n_buffers, hypers):
    "fullgraph tracing (the `eager` backend: tracing only, fast) with 0-d tensor step and hyperparameters, past the warm-ups"
    torch._dynamo.reset()
    cfn = torch.compile(fn, backend='eager', fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    a = [torch.zeros(3, 4, dtype=torch.float64) for _ in range(n_buffers)]
    b = [x.clone() for x in a]
    takes_step = 'step' in inspect.signature(fn).parameters
    for t in range(1, 9):
        g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        s, ts = (dict(step=t), dict(step=torch.tensor(float(t), dtype=torch.float64))) if takes_step else ({}, {})
        torch.testing.assert_close(cfn(g, *b, **_tensors(hypers), **ts), fn(g, *a, **hypers, **s), rtol=1e-12, atol=1e-12)
        for x, y in zip(a, b): torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
