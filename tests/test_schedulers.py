"""torch's own schedulers drive every optim_lab optimizer: OneCycleLR with `cycle_momentum=True` cycles the momentum."""
from __future__ import annotations

import pytest
import torch

from optim_lab import list_optimizers, load_optimizer

torch.set_num_threads(1)

MOMENTUM_KEYS = ('betas', 'momentum', 'beta')
# torch schedulers look for `momentum` or `betas`. Nero keeps pytorch-optimizer's (and the paper's) name `beta`, so
# that a user switches by changing the import; fastai schedules it through `opt_func`, torch's OneCycleLR cannot.
NAMED_BETA = {'Nero'}
STEPS, BASE_MOM, MAX_MOM = 40, 0.85, 0.95


def has_momentum(name: str) -> bool:
    opt = load_optimizer(name)([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    return any(k in opt.defaults for k in MOMENTUM_KEYS)


def momentum_of(group: dict) -> float:
    "The momentum a torch scheduler sets: `momentum`, or `betas[0]`"
    return group['momentum'] if 'momentum' in group else group['betas'][0]


WITH_MOMENTUM = [n for n in list_optimizers() if has_momentum(n)]
CASES = [pytest.param(n, marks=pytest.mark.xfail(reason=f'{n} names its momentum `beta`, which torch schedulers '
                                                        'do not know (the peer-compatible name)',
                                                 raises=ValueError, strict=True))
         if n in NAMED_BETA else n for n in WITH_MOMENTUM]


def test_the_momentum_optimizers_are_found():
    "The selection is not empty and holds the optimizers we know have a momentum"
    assert {'Adam', 'SGD', 'RAdam', 'LAMB', 'UM', 'PreLAMB'} <= set(WITH_MOMENTUM)


@pytest.mark.parametrize('name', CASES)
def test_one_cycle_lr_cycles_momentum(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    opt = load_optimizer(name)([w], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS, cycle_momentum=True,
                                                base_momentum=BASE_MOM, max_momentum=MAX_MOM)
    create_graph = getattr(opt, 'needs_create_graph', False)  # AdaHessian: Hessian-vector products

    def closure():  # every optimizer takes one; line searches and SAM need it
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward(create_graph=create_graph)
        return loss

    lrs, moms = [], []
    for t in range(STEPS):
        if t: sched.step()  # the scheduler set step 0's values when it was built
        lrs.append(opt.param_groups[0]['lr'])
        moms.append(momentum_of(opt.param_groups[0]))
        opt.step(closure)
    assert torch.isfinite(w).all()
    assert moms[0] == pytest.approx(MAX_MOM)                   # high momentum while the lr is small
    assert min(moms) == pytest.approx(BASE_MOM, abs=1e-3)      # lowest ...
    assert moms.index(min(moms)) == lrs.index(max(lrs))        # ... at the lr's peak
    assert moms[-1] == pytest.approx(MAX_MOM, abs=1e-3)        # and back up as the lr anneals
