"""The float64 reference checks of Shampoo, SOAP, Muon and LAMB on `rotated_quadratic` (chapter 04): g = Aθ + ξ with
A = QΛQᵀ, condition number 100, where a preconditioner has curvature to estimate (the noisy quadratic's H = I cannot
tell one from a bug that ignores curvature). The transcriptions are reused, not rewritten: Muon's and SOAP's from
tests/test_muon_soap.py, Shampoo's (chapter 28) and LAMB's (chapter 15) from the chapter's own defining cell."""
from __future__ import annotations
import itertools
import json
import math
import os
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
import pytest
import torch

from optim_lab.checks import noisy_quadratic, reference_check, rotated_quadratic
from optim_lab.optimizers.lamb import LAMB
from optim_lab.optimizers.muon import Muon
from optim_lab.optimizers.shampoo import Shampoo
from optim_lab.optimizers.soap import SOAP
from test_muon_soap import MUON_OTHER, muon_reference, soap_reference

NBS = Path(__file__).resolve().parent.parent / 'nbs'


def from_chapter(notebook: str, name: str):
    "The function `name` as chapter `notebook` defines it: its one defining code cell (nothing but the def), executed"
    cells = json.loads((NBS / notebook).read_text())['cells']
    found = [''.join(c['source']) for c in cells if c['cell_type'] == 'code' and f'def {name}(' in ''.join(c['source'])]
    assert len(found) == 1, f'{notebook}: {len(found)} cells define {name}'
    namespace = dict(math=math, torch=torch, itertools=itertools)
    exec(compile(found[0], f'{notebook}:{name}', 'exec'), namespace)
    return namespace[name]


shampoo_reference = from_chapter('28_shampoo.ipynb', 'shampoo_reference')
lamb_reference = from_chapter('15_lamb.ipynb', 'lamb_reference')

EXACT = dict(preconditioning_compute_steps=1, start_preconditioning_step=1, graft_type='none', block_size=None)  # the paper's rule
SHAMPOO_SETTINGS = [dict(lr=1e-2, **EXACT), dict(lr=1e-2, matrix_eps=0.1),
                    dict(lr=1e-2, momentum=0.9, preconditioning_compute_steps=3, start_preconditioning_step=1, matrix_eps=0.1),
                    dict(lr=1e-2, graft_type='sgd', start_preconditioning_step=4, preconditioning_compute_steps=5,
                         matrix_eps=0.1, block_size=2),
                    dict(lr=1e-2, weight_decay=0.1, matrix_eps=1e-3, max_precond_dim=4, block_size=3,
                         preconditioning_compute_steps=1)]
SOAP_SETTINGS = [dict(), dict(lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.8, weight_decay=0.1, precondition_frequency=3,
                              eps=1e-6, normalize_gradient=True), dict(correct_bias=False, precondition_frequency=1)]
LAMB_SETTINGS = [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1),
                 dict(lr=3e-2, weight_decay=0.5, bias_correction=False, clamp_value=1.0)]

# (optimizer, reference, settings, shapes, steps, noise, tolerance): each chapter's shapes, steps and tolerance
CASES = {
    'Shampoo': (Shampoo, shampoo_reference, SHAMPOO_SETTINGS, ((7,), (4, 5), (3, 2, 5), (2, 3, 2, 2), ()), 60, 1.0, 1e-10),
    'SOAP': (SOAP, soap_reference, SOAP_SETTINGS, ((7,), (5, 5), (4, 4), (4, 6), (6, 3), (3, 7)), 40, 3.0, 1e-10),
    'Muon': (Muon, muon_reference, [dict(), MUON_OTHER], ((7,), (4, 6), (6, 3), (3, 2, 2, 2)), 40, 3.0, 1e-12),
    'LAMB': (LAMB, lamb_reference, LAMB_SETTINGS, ((7,), (4, 5)), 60, 1.0, 1e-12),
}
PARAMS = [(name, i) for name, case in CASES.items() for i in range(len(case[2]))]


@pytest.mark.parametrize('name,i', PARAMS, ids=[f'{n}-{i}' for n, i in PARAMS])
def test_float64_reference_on_the_rotated_quadratic(name, i):
    opt, reference, settings, shapes, steps, noise, tol = CASES[name]
    dev = reference_check(opt, reference, steps=steps, shapes=shapes, noise=noise, problem=rotated_quadratic, **settings[i])
    assert dev < tol, (name, settings[i], dev)


def test_the_rotated_problem_moves_them_elsewhere():
    "Each optimizer's iterates on the rotated problem are not those on H = I: the check above ran on another problem"
    for name, (opt, reference, settings, shapes, steps, noise, tol) in CASES.items():
        shape = shapes[1]
        ends = [reference(*problem(shape, steps, 0, noise), steps, **settings[0])[-1] for problem in (noisy_quadratic, rotated_quadratic)]
        assert (ends[0] - ends[1]).abs().max() > 1e-2, name
