"The lab's instrument (chapter 92): schedules against a hand loop, the store's keys, the protocol's fairness, the scores"
import math

import numpy as np
import pytest
import torch

from optim_lab import lab
from optim_lab.problems import IllConditionedQuadratic, run_problem


def test_scheduled_sgd_matches_a_hand_loop():
    "run_problem's `lr_lambda` is the lr factor after t steps: SGD on a quadratic against the float64 recursion"
    problem, steps, lr = IllConditionedQuadratic(dim=5, cond=10.0), 30, 0.05
    factor = lab.warmup_cosine(steps, warmup=0.1)
    r = run_problem(problem, lambda ps: torch.optim.SGD(ps, lr=lr), steps, lr_lambda=factor)
    theta, ref = torch.zeros(5, dtype=torch.float64, requires_grad=True), []
    for t in range(steps):
        loss = 0.5 * (problem.root.double() @ (theta - problem.x_star.double())).pow(2).sum()   # in float64
        ref.append(loss.item())
        g, = torch.autograd.grad(loss, theta)
        with torch.no_grad(): theta -= lr * factor(t) * g
    np.testing.assert_allclose(r['losses'], ref, rtol=1e-5, atol=1e-7)


def test_evaluation_happens_at_the_optimizers_evaluation_point():
    "An optimizer with eval()/train() (schedule-free) is evaluated in eval mode and left in train mode"
    calls = []
    class Switching(torch.optim.SGD):
        def eval(self): calls.append('eval')
        def train(self): calls.append('train')
    r = run_problem(IllConditionedQuadratic(dim=3), lambda ps: Switching(ps, lr=0.01), 4, eval_every=2)
    assert calls == ['eval', 'train'] * 4          # checkpoints at 0, 2, 4 and the final value
    assert len(r['evals']) == 3


def test_every_optimizer_gets_the_same_points():
    gru = lab.workload_named('digits_gru')
    a, b = lab.trial_configs('AdamW', gru), lab.trial_configs('Muon', gru)
    np.testing.assert_allclose([c['lr'] / lab.centre_lr('AdamW', gru) for c in a],
                               [c['lr'] / lab.centre_lr('Muon', gru) for c in b], rtol=1e-12)
    assert [c['weight_decay'] for c in a] == [c['weight_decay'] for c in b]
    assert all(c['weight_decay'] == 0.0 for c in lab.trial_configs('AdamW', lab.workload_named('rosenbrock')))


def test_weight_decay_enters_in_the_optimizers_own_form():
    "Adam gets L2 decay, AdamW decoupled decay: one step from the same point differs as torch.optim's do"
    for name, reference in (('Adam', torch.optim.Adam), ('AdamW', torch.optim.AdamW)):
        p, q = (torch.ones(4, requires_grad=True) for _ in range(2))
        ours = lab.optimizer_factory(name, dict(lr=0.1, weight_decay=0.5), steps=10)([p])
        theirs = reference([q], lr=0.1, weight_decay=0.5)
        for x, opt in ((p, ours), (q, theirs)):
            x.grad = torch.full((4,), 0.2)
            opt.step()
        torch.testing.assert_close(p, q)


def test_store_keys_follow_the_code():
    "A task's key changes with the optimizer's source, its config and its seed, and with nothing else"
    w, protocol = lab.workload_named('tabular_mlp'), lab.Protocol()
    config = dict(lr=1e-3, weight_decay=0.0, schedule='warmup_cosine', warmup=0.05)
    key = lambda name, cfg=config, seed=0: lab.task(name, w, cfg, seed, protocol)['key']
    assert key('AdamW') == key('AdamW')
    assert len({key('AdamW'), key('Adam'), key('AdamW', seed=1), key('AdamW', dict(config, lr=2e-3))}) == 4
    assert lab.source_of('Adam') != lab.source_of('Lion')


def test_store_resumes(tmp_path):
    store = lab.Store(tmp_path / 'runs.sqlite')
    t = lab.task('AdamW', lab.workload_named('rosenbrock'), dict(lr=1e-3, schedule='constant', warmup=0.0), 0,
                 lab.Protocol(), steps=5)
    first = lab.execute([t], store, progress=False)
    assert len(store) == 1 and lab.Store(tmp_path / 'runs.sqlite').get(t['key']) == first[0]
    assert lab.execute([t, t], store, progress=False) == first * 2 and len(store) == 1


def test_profile_scores_by_hand():
    rows = [dict(optimizer='A', workload='w', cost_steps=10.0), dict(optimizer='B', workload='w', cost_steps=20.0)]
    taus = np.geomspace(1, lab.TAU_MAX, 64)
    scores = lab.profile_scores(rows)
    assert scores['A'] == 1.0
    assert scores['B'] == pytest.approx(np.mean(taus >= 2))


def test_targets_and_time_to_target():
    rows = [dict(optimizer='AdamW', workload='w', finals=[1.0, 1.2, 1.1], cpu_per_step=1.0,
                 curves=[[(0, 3.0), (10, 1.5), (20, 1.0)]] * 3),
            dict(optimizer='Shampoo', workload='w', finals=[0.9] * 3, cpu_per_step=4.0,
                 curves=[[(0, 3.0), (10, 1.0), (20, 0.9)]] * 3)]
    goal = lab.targets(rows)
    assert goal['w'] == pytest.approx(1.1 + 2 * 0.1)                    # median + 2 seed SDs of the best baseline
    timed = {r['optimizer']: r for r in lab.time_to_target(rows, goal)}
    assert timed['AdamW']['steps'] == 20 and timed['Shampoo']['steps'] == 10
    assert timed['Shampoo']['cost_steps'] == 40                         # 10 steps at 4x AdamW's step cost
    assert math.isinf(lab.steps_to_target([(0, 0.1), (5, 2.0)], 1.0))   # the start does not count


def test_an_optimizer_defined_in_a_notebook_has_a_fingerprint():
    "A class whose module has no source file (a notebook's `__main__`) is fingerprinted by its functions' bytecode"
    import sys, types
    from optim_lab.core import LabOptimizer
    from optim_lab.registry import register, _REGISTRY
    main, saved = sys.modules['__main__'], dict(_REGISTRY)
    sys.modules['__main__'] = types.ModuleType('__main__')
    def define(step: str):
        ns = {'LabOptimizer': LabOptimizer, '__name__': '__main__'}
        exec(f"class HalfStep(LabOptimizer):\n    def update(self, p, grad, state, group): return {step}", ns)
        register(ns['HalfStep'])
        return lab.source_of('HalfStep')
    try:
        first, again, other = define('0.5 * grad'), define('0.5 * grad'), define('0.25 * grad')
        assert first == again != other
    finally:
        sys.modules['__main__'] = main
        _REGISTRY.clear(); _REGISTRY.update(saved)

def test_low_rank_optimizers_run_projected():
    "GaLore and APOLLO enter the lab with a rank on every matrix (else they would be AdamW under another name)"
    from optim_lab.lab import optimizer_factory
    ps = [torch.nn.Parameter(torch.zeros(16, 8)), torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(4, 12))]
    for name in ('GaLore', 'APOLLO'):
        opt = optimizer_factory(name, dict(lr=1e-3, weight_decay=0.0), 10)(ps)
        assert sorted(g.get('rank') or 0 for g in opt.param_groups) == [0, 1, 2]
    assert len(optimizer_factory('AdamW', dict(lr=1e-3), 10)(ps).param_groups) == 1


def test_rows_from_the_store_alone(tmp_path):
    "`tune(run=False)` makes no run: a pair with a run missing from the store has no row, the others come back unchanged"
    store, protocol = lab.Store(tmp_path / 'runs.sqlite'), lab.Protocol(trials=2, seeds=2, extend=0)
    workloads = lab.suite(('rosenbrock', 'tabular_mlp'))
    made = lab.tune(['AdamW', 'Lion'], workloads, protocol, store, progress=False, steps=6)
    assert len(made) == 4 and len(store) == 2 * (2 + 2 + 1)     # rosenbrock is deterministic: no extra seed
    tasks = store.tasks()
    assert store.get_many(tasks) == [store.get(t['key']) for t in tasks]
    assert all(lab.is_current(t) for t in tasks) and not lab.is_current(dict(tasks[0], seed=7))   # a key that no code gives
    lion_lm = next(t for t in tasks if t['optimizer'] == 'Lion' and t['workload'] == 'tabular_mlp' and t['seed'] == 1)
    with store._connect() as db: db.execute('DELETE FROM runs WHERE key = ?', (lion_lm['key'],))
    held = lab.tune(['AdamW', 'Lion'], workloads, protocol, store, progress=False, steps=6, run=False)
    assert len(store) == 9                                       # nothing was run again
    assert {(r['optimizer'], r['workload']) for r in held} == {('AdamW', 'rosenbrock'), ('AdamW', 'tabular_mlp'), ('Lion', 'rosenbrock')}
    assert [r['finals'] for r in held] == [r['finals'] for r in made if (r['optimizer'], r['workload']) != ('Lion', 'tabular_mlp')]


def _row(name, workload, finals, lr=1e-3):
    curves = [[(0, 9.0), (50, f + 1.0), (100, f)] for f in finals]
    return dict(optimizer=name, workload=workload, finals=finals, curves=curves, config=dict(lr=lr))


def test_calibration_verdicts_by_hand():
    "The measuring rules on rows whose answer is known: a large gap agrees, a gap inside the seed noise does not"
    from optim_lab import lab_report as rep
    far = {('AdamW', 'char_lm'): _row('AdamW', 'char_lm', [2.0, 2.01, 2.02]),
           ('SGDNesterov', 'char_lm'): _row('SGDNesterov', 'char_lm', [2.6, 2.61, 2.62])}
    assert rep.adam_beats_sgd(far)[1] == 'agrees'
    near = {**far, ('SGDNesterov', 'char_lm'): _row('SGDNesterov', 'char_lm', [2.005, 2.015, 2.025])}
    assert rep.adam_beats_sgd(near)[1] == 'disagrees'
    # Muon's curve goes 9 -> 2.0 at step 50 -> 1.0 at 100: it passes AdamW's final (2.01) at step 50 of 100
    muon = {**far, ('Muon', 'char_lm'): _row('Muon', 'char_lm', [1.0, 1.0, 1.0])}
    text, verdict = rep.fewer_steps_than_adamw('Muon', 0.75)(muon)
    assert verdict == 'agrees' and 'step 50 of 100' in text
    lion = {(n, w): _row(n, w, [1.0], lr=lr) for w in rep.DEEP_LEARNING for n, lr in (('AdamW', 1e-3), ('Lion', 2e-4))}
    assert rep.lion_lr(lion)[1] == 'agrees' and 'median 5.0' in rep.lion_lr(lion)[0]
    assert rep.calibration([])[0]['verdict'] == 'n/a'


def test_the_command_line_keys_runs_as_an_import_does(tmp_path):
    "Runs made by `python -m optim_lab.lab` are found by `tune` in a notebook: both compute the same store keys"
    import subprocess, sys
    subprocess.run([sys.executable, '-m', 'optim_lab.lab', '--out', str(tmp_path), '--only', 'Adam', '--workloads', 'tabular_mlp',
                    'rosenbrock', '--quick', '--steps', '4'], check=True, capture_output=True)
    tasks = lab.Store(tmp_path / 'runs.sqlite').tasks()
    assert {t['workload'] for t in tasks} == {'tabular_mlp', 'rosenbrock'} and all(lab.is_current(t) for t in tasks)


def test_a_best_lr_at_the_edge_is_searched_past_it(tmp_path):
    """SGD on Rosenbrock in 6 steps: its two larger trial lrs diverge and the best lies at the bottom edge of the search,
    so 3 more trials go 1/3, 2/3 and 1 decade below the bottom; none is better, and the best is no longer at an edge"""
    protocol, w = lab.Protocol(trials=3, seeds=1), lab.workload_named('rosenbrock')
    [row] = lab.tune(['SGD'], [w], protocol, lab.Store(tmp_path / 'runs.sqlite'), progress=False, steps=6)
    bottom = lab.centre_lr('SGD', w) * 10 ** protocol.lr_decades[0]
    first = [c['lr'] for c in lab.trial_configs('SGD', w, protocol)]
    assert lab.edge_of('SGD', w, dict(lr=min(first)), protocol) == 'low'
    assert row['extended'] == 3 and row['trials'] == 6
    assert [t['lr'] for t in row['tried'][3:]] == pytest.approx([bottom / 10 ** (j / 3) for j in (1, 2, 3)], rel=1e-12)
    assert row['config']['lr'] == min(first) and row['edge'] == ''
