"""The source of Clybius/Personalized-Optimizers at the commit chapters 47-49 transcribe, for the tests that run
upstream's own classes beside ours (tests/test_fishmonger_farmscrop.py, tests/test_fmarscrop.py).

A copy of that repository (a clone or a bare git directory holding the commit) is looked for, first found wins:

1. the directory named by the environment variable ``PERSONALIZED_OPTIMIZERS_GIT``;
2. a mirror beside the checkout, ``<checkout>/../.mirror/Clybius+Personalized-Optimizers/repo``.

Without either, the tests that need upstream's source are skipped, and the skip says how to provide it:
``git clone https://github.com/Clybius/Personalized-Optimizers`` and point the variable at the clone. A variable that
is set but names no usable repository fails the test instead, so that a broken setting is not silently skipped."""
from __future__ import annotations
import os
import subprocess
from pathlib import Path

import pytest

URL = 'https://github.com/Clybius/Personalized-Optimizers'
COMMIT = 'bfa2fdd'
ENV = 'PERSONALIZED_OPTIMIZERS_GIT'
BESIDE = Path(__file__).resolve().parents[1].parent / '.mirror' / 'Clybius+Personalized-Optimizers' / 'repo'
HOW = f'clone {URL} and set {ENV} to the clone to run the comparison with upstream'


def upstream_repo() -> tuple[Path | None, bool]:
    "The upstream repository to read, and whether the environment variable named it"
    if os.environ.get(ENV): return Path(os.environ[ENV]).expanduser(), True
    return (BESIDE, False) if BESIDE.exists() else (None, False)


def upstream_source(filename: str, commit: str = COMMIT) -> str:
    "The text of `filename` at `commit`, read with git (never imported from a path); skips when there is no copy"
    repo, named = upstream_repo()
    if repo is None: pytest.skip(f'no copy of upstream {URL} at {COMMIT}: {HOW}')
    try:
        out = subprocess.run(['git', '-C', str(repo), 'show', f'{commit}:{filename}'], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip('git is not installed: cannot read upstream source')
    if out.returncode:
        message = f'cannot read {filename} at {commit} from {repo}: {out.stderr.strip()}'
        if named: pytest.fail(f'{ENV}={repo}: {message}')
        pytest.skip(f'{message}; {HOW}')
    return out.stdout


def upstream_class(filename: str, name: str, commit: str = COMMIT) -> type:
    "Upstream's optimizer class `name`, executed from its source text at `commit` (each file imports only torch)"
    namespace = {}
    exec(compile(upstream_source(filename, commit), f'{filename}@{commit}', 'exec'), namespace)
    return namespace[name]
