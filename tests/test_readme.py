"""Every ```python block of README.md runs as written: each `## ` section's blocks, in order, in a fresh namespace."""
from __future__ import annotations
import re, warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks(text: str) -> dict[str, list[str]]:
    "The ```python code blocks of a markdown text, grouped by the `## ` section they are in"
    sections, heading = {}, None
    for part in re.split(r'^(## .*)$', text, flags=re.M):
        if part.startswith('## '): heading = part[3:].strip()
        else:
            blocks = re.findall(r'^```python\n(.*?)^```', part, flags=re.M | re.S)
            if blocks: sections[heading] = blocks
    return sections


SECTIONS = python_blocks(README.read_text())


def test_the_blocks_are_found():
    "The parser sees the quick starts, so the test below cannot pass by finding nothing"
    assert {'Quick start: plain PyTorch', 'Quick start: fastai'} <= set(SECTIONS)
    assert python_blocks("## A\n```python\nx = 1\n```\ntext\n```sh\nls\n```\n## B\n```python\ny = 2\n```\n") == \
        {'A': ['x = 1\n'], 'B': ['y = 2\n']}


@pytest.mark.parametrize('section', list(SECTIONS))
def test_readme_section_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a snippet writes stays out of the repository
    namespace = {'__name__': '__readme__'}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch's about fastai's use of torch.jit.script
        for i, code in enumerate(SECTIONS[section]):
            exec(compile(code, f'README.md [{section}] block {i}', 'exec'), namespace)
