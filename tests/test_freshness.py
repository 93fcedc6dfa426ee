"""The freshness comparator (optim_lab.freshness, chapter 95) on planted cases: committed outputs against a fresh run
built by hand, so nothing is executed. A number moved beyond the tolerance is stale, one within it is not, changed
text is stale, a cell marked `#| fresh: skip` is ignored, and a line only one side has is reported once."""
import nbformat
import pytest

from optim_lab.freshness import compare_lines, lines_agree, main, stale_outputs


def _notebook(*cells):
    "A notebook of code cells, each given as (source, stdout text)"
    return nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(source, outputs=[nbformat.v4.new_output('stream', name='stdout', text=text)])
        for source, text in cells])


def _check(tmp_path, committed, fresh, **tol):
    path = tmp_path / 'chapter.ipynb'
    nbformat.write(_notebook(*committed), path)
    return stale_outputs(path, fresh=_notebook(*fresh), **tol)


CELLS = [('import torch', ''), ('print(loss)', 'final loss 0.4120\nsteps 40\n'), ('print(ok)', 'the peer agrees\n')]


def test_unchanged_is_fresh(tmp_path):
    assert _check(tmp_path, CELLS, CELLS) == []


def test_number_beyond_tolerance_is_stale(tmp_path):
    fresh = [CELLS[0], ('print(loss)', 'final loss 0.4500\nsteps 40\n'), CELLS[2]]    # 8.4% apart
    assert _check(tmp_path, CELLS, fresh) == [(1, 'final loss 0.4120', 'final loss 0.4500')]


def test_number_within_tolerance_is_fresh(tmp_path):
    fresh = [CELLS[0], ('print(loss)', 'final loss 0.4200\nsteps 40\n'), CELLS[2]]    # 1.9% apart
    assert _check(tmp_path, CELLS, fresh) == []
    assert _check(tmp_path, CELLS, fresh, rtol=0.01) == [(1, 'final loss 0.4120', 'final loss 0.4200')]


def test_changed_text_is_stale(tmp_path):
    fresh = [*CELLS[:2], ('print(ok)', 'the peer differs\n')]
    assert _check(tmp_path, CELLS, fresh) == [(2, 'the peer agrees', 'the peer differs')]


def test_skipped_cell_is_ignored(tmp_path):
    committed = [*CELLS, ('#| fresh: skip\nprint(timings)', 'Adam 2.31 ms/step\n')]
    fresh = [*CELLS, ('#| fresh: skip\nprint(timings)', 'Adam 3.70 ms/step\nunder load\n')]
    assert _check(tmp_path, committed, fresh) == []
    unmarked = [(source.replace('#| fresh: skip\n', ''), text) for source, text in committed]
    assert [i for i, *_ in _check(tmp_path, unmarked, fresh)] == [3, 3]


def test_timings_cell_exempts_only_durations(tmp_path):
    committed = [*CELLS, ('#| fresh: timings\nprint(fit)', 'valid loss 0.315; 178 steps in 1.3 s (2.4 ms/step)\n')]
    slower = [*CELLS, ('#| fresh: timings\nprint(fit)', 'valid loss 0.315; 178 steps in 2.7 s (5.1 ms/step)\n')]
    assert _check(tmp_path, committed, slower) == []
    worse = [*CELLS, ('#| fresh: timings\nprint(fit)', 'valid loss 0.415; 178 steps in 2.7 s (5.1 ms/step)\n')]
    assert [i for i, *_ in _check(tmp_path, committed, worse)] == [3]


def test_unknown_directive_value_is_refused(tmp_path):
    with pytest.raises(ValueError, match='skip or timings'):
        _check(tmp_path, [('#| fresh: never\nprint(1)', '1\n')], [('#| fresh: never\nprint(1)', '1\n')])


def test_added_line_is_reported_once():
    assert compare_lines(['steps 40', 'loss 0.41', 'done'], ['steps 40', 'extra 7', 'loss 0.41', 'done']) == [(None, 'extra 7')]
    assert compare_lines(['a 1', 'b 2'], ['a 1']) == [('b 2', None)]


@pytest.mark.parametrize('committed, fresh, same', [
    ('6,138 weights', '6,138 weights', True), ('6,138 weights', '6,500 weights', False),
    ('diff 3e-09', 'diff 8e-09', True),                # both below atol
    ('lr 1e-3', 'lr 1e-2', False), ('x -0.50', 'x 0.50', False),
    ('loss 0.5  (7 steps)', 'loss 0.5 (7 steps)', False),   # spacing is text
    ('<Lookahead object at 0x7f3a2c90>', '<Lookahead object at 0x55d1e0aa>', True)])
def test_lines(committed, fresh, same):
    assert lines_agree(committed, fresh) is same


def test_command_line_exit_status(tmp_path, capsys):
    "Exit 1 and the diff printed when a notebook is stale, 0 when every one is fresh (with saved runs, nothing executed)"
    saved = tmp_path / 'runs'; saved.mkdir()
    nbformat.write(_notebook(*CELLS), tmp_path / 'fresh.ipynb'); nbformat.write(_notebook(*CELLS), saved / 'fresh.ipynb')
    nbformat.write(_notebook(*CELLS), tmp_path / 'stale.ipynb')
    nbformat.write(_notebook(*CELLS[:2], ('print(ok)', 'the peer differs\n')), saved / 'stale.ipynb')
    assert main([str(tmp_path / 'fresh.ipynb'), '--fresh', str(saved)]) == 0
    assert main([str(tmp_path / 'fresh.ipynb'), str(tmp_path / 'stale.ipynb'), '--fresh', str(saved)]) == 1
    out = capsys.readouterr().out
    assert 'committed: the peer agrees' in out and 'fresh:     the peer differs' in out and 'stale: ' in out
