"""Compiling in a process whose `__main__` changes (IPython, a notebook runner running several notebooks in one
process): each optimizer's compiled step must trace against the `__main__` of its own time"""
import sys, types, warnings

import torch

SOURCE = '''
import torch
from optim_lab.core import LabOptimizer

def half_NAME(g): return 0.5 * g            # a global only this __main__ has, reached through another function
def direction(g): return half_NAME(g)

class Halving(LabOptimizer):
    "SGD on half the gradient, defined in __main__ as a notebook defines its optimizers"
    def __init__(self, params, lr=0.1, **kwargs): super().__init__(params, dict(lr=lr), **kwargs)
    def update(self, p, grad, state, group): return direction(grad)
'''

def step_under_a_new_main(shape, name: str) -> torch.Tensor:
    "A fresh module named `__main__` holding SOURCE (its helper called `half_<name>`); one compiled step from ones"
    main = types.ModuleType('__main__')
    sys.modules['__main__'] = main
    exec(SOURCE.replace('NAME', name), main.__dict__)
    p = torch.ones(shape, requires_grad=True)
    opt = main.Halving([p], compile=True)
    p.grad = torch.ones(shape)
    opt.step()
    return p.detach()

def test_each_main_is_traced_on_its_own():
    from optim_lab.core import CompileFallbackWarning
    original = sys.modules['__main__']
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', CompileFallbackWarning)
            for i, shape in enumerate([(3,), (4, 2), (3,)]):   # the third: the first's shape, under a third __main__
                torch.testing.assert_close(step_under_a_new_main(shape, f'n{i}'), torch.full(shape, 0.95))  # 1 - 0.1/2
    finally:
        sys.modules['__main__'] = original
