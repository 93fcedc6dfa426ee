"Shared fixtures for the optim_lab test suite: the registered optimizers and a small toy problem"
from __future__ import annotations
import importlib.util, inspect, os
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest
import torch
from torch import nn

from optim_lab import list_optimizers, load_optimizer

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same global RNG state, whatever ran before it in its process: pytest-xdist gives a
    process another set of files on another machine or worker count, and a rule that draws from the global RNG
    (AdaHessian's Hutchinson probes) would otherwise see another draw there"""
    torch.manual_seed(0)

# Every registered optimizer, by class name: the contract tests are parametrized over this list, so an
# optimizer added by a new chapter is covered without touching the tests.
ALL = list_optimizers()

DEFAULT_TOY_LR = 1e-2
# Per-optimizer learning rate for the toy problem, where the default does not make the loss fall in
# `TOY_STEPS` steps (e.g. a layer-wise trust ratio, or a rule whose step is not about lr per coordinate).
TOY_LR: dict[str, float] = {}
# Per-optimizer extra hyperparameters for the toy problem (empty: the class defaults).
TOY_HYPERS: dict[str, dict] = {}
TOY_STEPS = 150

# Optimizers whose update couples parameters (a global norm, a line search over all parameters): the test
# that a parameter's trajectory does not depend on the other parameters in the optimizer skips them.
CROSS_PARAM: set[str] = set()
# Hyperparameters for the lr=0 group of the two-group test, for rules that act at lr=0 by design (Nero's projection).
LR0_GROUP_HYPERS: dict[str, dict] = {}
# Absolute tolerance of the compile contract (eager vs compile=True after 20 steps) for rules that amplify float32
# rounding differences by design; the default is 1e-4.
COMPILE_ATOL: dict[str, float] = {}
# Rules whose one-process noise floor in tests/test_distributed.py is as large as their step, so that its 2-rank vs
# 1-process comparison cannot tell right from wrong; the value says why and where the sharded step is checked instead.
ROUNDING_CHAOTIC: dict[str, str] = {}
# Optimizers with no hyperparameter fastai's `mom` can mean (a decay rate of a first moment); the value says why.
NO_FASTAI_MOM: dict[str, str] = {}
# The short fastai fit of tests/test_fastai.py (one epoch of 20 batches, one-cycle's default moms): per-optimizer
# learning rate, epochs and the least drop of the validation loss it must show, where the default
# (lr=1e-2, n_epoch=1, min_drop=0.05) does not suit the rule.
FASTAI_FIT: dict[str, dict] = {}

# Each chapter family may add its own knobs in a `tests/knobs_<family>.py` defining any of TOY_LR, TOY_HYPERS and
# CROSS_PARAM; they are merged here, so that chapters written in parallel never edit the same file.
for _path in sorted(Path(__file__).parent.glob('knobs_*.py')):
    _spec = importlib.util.spec_from_file_location(_path.stem, _path)
    _knobs = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_knobs)
    TOY_LR.update(getattr(_knobs, 'TOY_LR', {}))
    TOY_HYPERS.update(getattr(_knobs, 'TOY_HYPERS', {}))
    CROSS_PARAM.update(getattr(_knobs, 'CROSS_PARAM', set()))
    LR0_GROUP_HYPERS.update(getattr(_knobs, 'LR0_GROUP_HYPERS', {}))
    COMPILE_ATOL.update(getattr(_knobs, 'COMPILE_ATOL', {}))
    ROUNDING_CHAOTIC.update(getattr(_knobs, 'ROUNDING_CHAOTIC', {}))
    NO_FASTAI_MOM.update(getattr(_knobs, 'NO_FASTAI_MOM', {}))
    FASTAI_FIT.update(getattr(_knobs, 'FASTAI_FIT', {}))


def opt_class(name: str) -> type: return load_optimizer(name)


def accepts(cls: type, name: str) -> bool:
    "Whether `cls.__init__` takes hyperparameter `name` as an explicit argument"
    return name in inspect.signature(cls.__init__).parameters


def toy_lr(name: str) -> float: return TOY_LR.get(name, DEFAULT_TOY_LR)


def make_opt(name: str, params, **overrides):
    "Optimizer `name` on `params` with the toy problem's lr and hypers, updated with `overrides`"
    hypers = dict(lr=toy_lr(name), **TOY_HYPERS.get(name, {}))
    hypers.update(overrides)
    return opt_class(name)(params, **hypers)


def toy_data(seed: int = 0, n: int = 64, d: int = 8, dtype=torch.float32):
    "A fixed regression data set: inputs (n, d) and targets of a random teacher MLP, (n, 1)"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w1, w2 = torch.randn(d, 16, generator=g) / d ** 0.5, torch.randn(16, 1, generator=g) / 4
    y = torch.tanh(x @ w1) @ w2 + 0.5
    return x.to(dtype), y.to(dtype)


class ToyMLP(nn.Module):
    "A tiny MLP with several parameters, one of which (`unused`) never gets a gradient"
    def __init__(self, d: int = 8, hidden: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l1 = nn.Linear(d, hidden)
            self.l2 = nn.Linear(hidden, 1)
            self.scale = nn.Parameter(torch.ones(1))
            self.unused = nn.Parameter(torch.randn(3, 2))
    def forward(self, x): return self.l2(torch.tanh(self.l1(x))) * self.scale


def backward(opt, loss):
    "`loss.backward()`, with the graph kept for optimizers that differentiate the gradient (AdaHessian)"
    loss.backward(create_graph=getattr(type(opt), 'needs_create_graph', False))


def toy_loss(model, x, y): return ((model(x) - y) ** 2).mean()


def closure_for(opt, model, x, y, sign: float = 1.0, record: list | None = None):
    "A closure that zeroes the gradients, computes `sign * loss`, backpropagates and returns it"
    def closure():
        opt.zero_grad()
        loss = sign * toy_loss(model, x, y)
        loss.backward(create_graph=getattr(type(opt), 'needs_create_graph', False))
        if record is not None: record.append(loss.detach().clone())
        return loss
    return closure


def train(opt, model, x, y, steps: int, sign: float = 1.0, batches: int = 1):
    "`steps` optimizer steps on the toy loss (times `sign`); with `batches` > 1, cycle over that many minibatches"
    n = len(x) // batches
    for t in range(steps):
        i = t % batches
        xb, yb = x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]
        closure = closure_for(opt, model, xb, yb, sign)
        if type(opt).needs_closure: opt.step(closure)
        else:
            closure()
            opt.step()


def loss_of(model, x, y) -> float:
    with torch.no_grad(): return toy_loss(model, x, y).float().item()


def state_tensors(opt):
    "Every tensor in the optimizer's per-parameter state, as (param index, key, tensor)"
    index = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g['params'])}
    return [(index[p], k, v) for p, s in opt.state.items() for k, v in s.items() if isinstance(v, torch.Tensor)]


@pytest.fixture(params=ALL)
def name(request) -> str:
    "The class name of each registered optimizer"
    return request.param
