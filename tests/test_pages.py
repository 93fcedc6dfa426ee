"""The committed notebooks are the book: what they show must be readable and current. No committed error output,
no control character in a source (a `\\r` written inside a non-raw string breaks `\\rangle`), no noise from the
toolchain in an output, no words of the development process in the product, and no fastai check that compares a
value with itself."""
from __future__ import annotations
import json, re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / 'nbs').glob('*.ipynb')) + [REPO / 'index.ipynb']
CONTROL = re.compile(r'[\x00-\x08\x0b\x0c\x0d\x0e-\x1f]')
NOISE = ('No CUDA runtime is found', '`torch.jit.script` is deprecated')
# Words about how the code was made, not what it does: an issue tracker, a team's roles, a machine, a date of writing,
# the material the project started from
PROCESS = re.compile(r"\bissue \d+|\bthe issue'?s?\b|\bhelper H\d|\bthese machines\b|when this chapter was written|"
                     r"\bseed notebook\b|\bthe seed's\b|\bseeds/0", re.IGNORECASE)


def _cells(nb_path: Path):
    return json.loads(nb_path.read_text())['cells']


def _text(output: dict) -> str:
    if output.get('output_type') == 'stream': return ''.join(output.get('text', ''))
    data = output.get('data', {})
    return ''.join(data.get('text/plain', '')) + ''.join(output.get('traceback', []))


def _problems(nb_path: Path) -> list[str]:
    found = []
    for i, cell in enumerate(_cells(nb_path)):
        source = ''.join(cell.get('source', ''))
        where = f'{nb_path.name} cell {i}'
        if CONTROL.search(source): found.append(f'{where}: control character {CONTROL.search(source)[0]!r} in the source')
        if PROCESS.search(source): found.append(f'{where}: development-process words {PROCESS.search(source)[0]!r}')
        if cell['cell_type'] == 'code' and 'recorder.moms' in source and 'param_groups' in source:
            found.append(f"{where}: compares a param group's momentum with recorder.moms, which fastai reads from that group")
        for out in cell.get('outputs', []):
            if out.get('output_type') == 'error': found.append(f"{where}: committed error output ({out.get('ename')})")
            text = _text(out)
            if 'Traceback (most recent call last)' in text: found.append(f'{where}: a traceback in the output')
            for noise in NOISE:
                if noise in text: found.append(f'{where}: toolchain noise in the output ({noise!r})')
    return found


@pytest.mark.parametrize('nb_path', NOTEBOOKS, ids=lambda p: p.name)
def test_page_is_clean(nb_path):
    problems = _problems(nb_path)
    assert not problems, '\n'.join(problems)


def test_the_page_checks_can_fail(tmp_path):
    "Each check finds what it is for, in a notebook written to fail every one of them"
    bad = {'cells': [
        {'cell_type': 'markdown', 'source': ['Fixed in issue 12; $\\langle u, v', '\r', 'angle$']},
        {'cell_type': 'code', 'source': ["test_eq(learn.opt.param_groups[0]['mom'], learn.recorder.moms[-1])"],
         'outputs': [{'output_type': 'error', 'ename': 'ValueError', 'evalue': '', 'traceback': []},
                     {'output_type': 'stream', 'text': ["W1207 No CUDA runtime is found, using CUDA_HOME='/usr'"]}]}]}
    path = tmp_path / 'bad.ipynb'
    path.write_text(json.dumps(bad))
    problems = '\n'.join(_problems(path))
    for expected in ('control character', 'development-process', 'recorder.moms', 'error output', 'toolchain noise'):
        assert expected in problems, (expected, problems)


def test_no_process_words_in_package_and_tests():
    "The package and the tests speak of the code too (this file excepted: it names the words to keep out)"
    files = [p for p in [*(REPO / 'optim_lab').rglob('*.py'), *(REPO / 'tests').glob('*.py'), REPO / 'Makefile',
                         REPO / 'README.md', *(REPO / 'examples').glob('*.py')]
             if p.name != Path(__file__).name and '__pycache__' not in p.parts]
    hits = [f'{p.relative_to(REPO)}:{n}: {m[0]!r}' for p in files
            for n, line in enumerate(p.read_text().splitlines(), 1) if (m := PROCESS.search(line))]
    assert not hits, '\n'.join(hits)
