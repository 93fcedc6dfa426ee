"""The benchmark's `--quick` run end to end (what `make lab` does, in miniature), checked against its own raw data
recomputed independently: the tuned lr is the sweep's best, the edge flags match the sweep, the profile scores
match the exact area under a step-function profile, and the README summary renders from the results folder."""
import json, math

import pytest

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
