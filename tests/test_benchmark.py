"""The benchmark's `--quick` run end to end (what `make bench` does, in miniature), checked against its own raw data
recomputed independently: the tuned lr is the sweep's best, the edge flags match the sweep, the profile scores
match the exact area under a step-function profile, and the README summary renders from the results folder. The
step-time table's state column against each algorithm's minimum, and its `--steps` command."""
import json, math

import pytest
import torch

from optim_lab.benchmark import SOLVED, TAU_MAX, main, read_csv, readme_summary

NAMES = ['SGD', 'Adam', 'Lion']


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp('lab')
    main(['--quick', '--only', *NAMES, '--out', str(out)])
    return out


def test_outputs(quick):
    for name in ('results.md', 'run.json', 'convergence.csv', 'sweep.csv', 'leaderboard.csv', 'profile.csv',
                 'step_time.csv', 'profile.png', 'heatmap.png', 'loss_curves.png', 'lr_sensitivity.png', 'step_time.png'):
        assert (quick / name).stat().st_size > 0, name
    run = json.loads((quick / 'run.json').read_text())
    assert run['optimizers'] == len(NAMES) + 1  # AdamW, the baseline, is added
    assert run['pairs'] == run['optimizers'] * len(run['problems'])
    assert 'char_transformer' in run['problems']
    board = read_csv(quick / 'leaderboard.csv')
    assert sorted(r['optimizer'] for r in board) == sorted(NAMES + ['AdamW'])


def test_tuned_lr_is_the_sweeps_best(quick):
    sweep = {}
    for r in read_csv(quick / 'sweep.csv'): sweep.setdefault((r['optimizer'], r['problem']), []).append((r['lr'], r['final']))
    for r in read_csv(quick / 'convergence.csv'):
        trials = sweep[r['optimizer'], r['problem']]
        assert len(trials) == r['trials']
        floored = {lr: max(f, SOLVED) for lr, f in trials}
        assert floored[min(floored, key=lambda lr: abs(math.log(lr / r['lr'])))] == min(floored.values()), r
        lrs = sorted(floored)
        at_edge = math.isclose(r['lr'], lrs[0], rel_tol=1e-9) or math.isclose(r['lr'], lrs[-1], rel_tol=1e-9)
        assert bool(r['edge']) == at_edge, r


def test_profile_score_is_the_area_under_the_profile(quick):
    rows = read_csv(quick / 'convergence.csv')
    fastest = {}
    for r in rows: fastest[r['problem']] = min(fastest.get(r['problem'], math.inf), r['steps_to_target'])
    scores = {}
    for r in rows:  # a problem solved at ratio x <= TAU_MAX adds the rectangle from max(x, 1) to TAU_MAX under rho
        x = r['steps_to_target'] / fastest[r['problem']] if math.isfinite(r['steps_to_target']) else math.inf
        area = (TAU_MAX - max(x, 1.0)) / (TAU_MAX - 1) if x <= TAU_MAX else 0.0
        scores.setdefault(r['optimizer'], []).append(area)
    for b in read_csv(quick / 'leaderboard.csv'):
        assert b['profile_score'] == pytest.approx(sum(scores[b['optimizer']]) / len(scores[b['optimizer']]), abs=0.01)
    ranked = [b['profile_score'] for b in read_csv(quick / 'leaderboard.csv')]
    assert ranked == sorted(ranked, reverse=True)


def test_adamw_reaches_its_own_target(quick):
    for r in read_csv(quick / 'convergence.csv'):
        if r['optimizer'] == 'AdamW': assert r['steps_to_target'] <= 0.75 * 40 + 2, r  # --quick runs 40 steps


def test_readme_summary(quick):
    text = readme_summary(quick)
    run = json.loads((quick / 'run.json').read_text())
    assert run['date'] in text and '| rank | optimizer |' in text
    assert 'torch Adam (foreach)' in text and '| Adam |' in text


# Bytes of state per fp32 parameter each algorithm must keep, and the settings that time it: Adam's m and v; Lion's
# and SGD-momentum's one buffer; Adam-mini's m (its v is one number per block); AdaFactor without momentum keeps only
# the factored second moment, one number per row and column (~0 per parameter)
MINIMA = {'Adam': ({}, 8.0), 'Lion': ({}, 4.0), 'SGD': (dict(momentum=0.9), 4.0), 'AdamMini': ({}, 4.0),
          'AdaFactor': (dict(betas=(None, 0.999)), 0.0)}
# what is above the minimum: Adam-mini's block means, AdaFactor's row and column factors and the full v of its vectors,
# on STEP_WORKLOAD about 0.03 B per parameter; anything near a whole extra buffer (4 B) is a failure
SLACK_B = 0.1


def measured_state(name, **hypers):
    from optim_lab.benchmark import STEP_WORKLOAD, make_params, state_bytes_per_param
    from optim_lab.registry import load_optimizer
    opt = load_optimizer(name)(make_params(STEP_WORKLOAD), **hypers)
    opt.step(); opt.step()
    return state_bytes_per_param(opt)


@pytest.mark.parametrize('name', MINIMA)
def test_state_is_the_algorithms_minimum(name):
    hypers, minimum = MINIMA[name]
    assert minimum <= measured_state(name, **hypers) <= minimum + SLACK_B


def test_state_minimum_column():
    "The table's minimum is the algorithm's as timed (SGD with momentum, AdaFactor with its default β1 = 0.9: m)"
    from optim_lab.benchmark import STATE_MINIMUM_B, STEP_TIME_HYPERS, STEP_WORKLOAD, make_params, state_bytes_per_param
    for name in ('Adam', 'Lion', 'SGD', 'AdamMini'): assert STATE_MINIMUM_B[name] == MINIMA[name][1]
    assert STEP_TIME_HYPERS['SGD'] == MINIMA['SGD'][0]
    assert 4.0 <= measured_state('AdaFactor') <= STATE_MINIMUM_B['AdaFactor'] + SLACK_B
    torch_adam = torch.optim.Adam(make_params(STEP_WORKLOAD)); torch_adam.step()   # an independent count of Adam's 8 B
    assert state_bytes_per_param(torch_adam) == STATE_MINIMUM_B['Adam']


def test_steps_command(tmp_path):
    "--steps writes the step-time table alone, its caption naming the machine"
    main(['--steps', '--quick', '--only', 'SGD', 'Lion', '--compile', 'none', '--out', str(tmp_path)])
    text = (tmp_path / 'step_time.md').read_text()
    info = json.loads((tmp_path / 'machine.json').read_text())
    assert f"measured on {info['cpu']}" in text and f"torch {torch.__version__}" in text and "thread" in text
    assert '| optimizer | family | eager_vs_fused | compile_vs_fused | peer | peer_vs_fused | state_B_per_param |' in text
    rows = {r['optimizer']: r for r in read_csv(tmp_path / 'step_time.csv')}
    assert set(rows) == {'SGD', 'Lion', 'torch Adam (foreach)'}
    assert rows['SGD']['state_B_per_param'] == rows['SGD']['state_min_B'] == 4.0
    assert rows['SGD']['peer'] == 'torch.optim.SGD' and rows['SGD']['peer_vs_fused'] > 0


def test_steps_command_measures_the_state_of_graph_optimizers(tmp_path):
    "SophiaH's step needs the loss's graph: its row has its state (m and the Hessian moment: 8 B), no timing, and the caption says why"
    main(['--steps', '--quick', '--only', 'SophiaH', '--compile', 'none', '--out', str(tmp_path)])
    row = {r['optimizer']: r for r in read_csv(tmp_path / 'step_time.csv')}['SophiaH']
    assert row['state_B_per_param'] == 8.0 and math.isnan(row['eager_vs_fused'])
    assert 'SophiaH step with a Hessian-vector product' in (tmp_path / 'step_time.md').read_text()
