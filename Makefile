# `make test` and `make lab` each install everything they need into .venv, from nothing.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
PY    := $(BIN)/python
STAMP := $(VENV)/.installed
OUT   ?= lab_results
# One torch thread per process: nbdev_test runs two notebooks at a time, and pytest two test files at a time.
export OMP_NUM_THREADS ?= 1
# With more threads per process, fewer processes, so that processes × threads never exceeds the cores (oversubscribed
# OpenMP threads spin against each other): OMP_NUM_THREADS=2 on 2 cores runs one notebook at a time.
WORKERS ?= $(shell n=$$(( $$(nproc 2>/dev/null || echo 2) / $(OMP_NUM_THREADS) )); echo $$(( n < 1 ? 1 : n > 2 ? 2 : n )))
export MPLBACKEND ?= Agg
export PYTHONHASHSEED ?= 0

.PHONY: test lab bench bench-steps lab-quick lab-ray lab-check install system-packages sync-check nbtest pytest export outputs outputs-check clean docs readme

install: $(STAMP)

$(STAMP): requirements-dev.txt constraints.txt setup.py settings.ini | system-packages
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

## Debian's chromium (the book's browser test) and npm (it fetches the book's MathJax), where apt-get works as root.
## Elsewhere nothing is installed and nothing fails: the browser test then skips, saying why.
system-packages:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "apt-get install$$missing"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	    || echo "warning: apt-get could not install$$missing"; \
	fi

## The whole test suite: notebooks and package in sync, every notebook run as a test, then pytest.
test: $(STAMP) sync-check nbtest pytest

sync-check: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  if ! git diff --quiet -- . || [ -n "$$(git ls-files --others --exclude-standard -- optim_lab nbs index.ipynb)" ]; then \
	    echo "nbdev_export/nbdev_clean changed tracked files: notebooks and package out of sync, or notebooks not cleaned:"; \
	    git status --short; git diff --stat; exit 1; \
	  fi; echo "sync-check: notebooks, package and cleaning agree"; \
	else echo "sync-check: not a git checkout, skipped"; fi

nbtest: $(STAMP)
	$(BIN)/nbdev_test --n_workers $(WORKERS) --timing $(NBFLAGS)

pytest: $(STAMP)
	$(BIN)/pytest tests -q -rs -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

## The main job, the lab's tuned campaign (chapters 92-93): both suites, every optimizer and registered chain. Each run
## is made once, into $(OUT)/runs.sqlite (committed), so after a change to one optimizer only its runs are made again;
## then both leaderboards, the calibration table, the costs and the figures are written into $(OUT)/.
lab: $(STAMP)
	$(PY) -m optim_lab.lab --out $(OUT) --workers 2 $(LAB_ARGS)

## The untuned benchmark of chapter 90 (a log grid of constant learning rates on the problem suite) into $(OUT)/.
bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m optim_lab.benchmark --out $(OUT) $(LAB_ARGS)

## The step table alone (eager, compile=True, the peer, state bytes against the algorithm's minimum, the machine):
## into lab_results/steps/, shown by chapter 90; run it on a quiet machine.
bench-steps: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m optim_lab.benchmark --steps --threads 2 --compile main --out $(OUT)/steps $(LAB_ARGS)

## A smoke run of the campaign (a few minutes), and the honesty check: 5 random stored runs made again.
lab-quick: $(STAMP)
	$(PY) -m optim_lab.lab --out $(OUT)/quick --quick --workers 2 $(LAB_ARGS)

## The smoke run on a local Ray cluster (ray is not a test requirement: installed here, pinned)
lab-ray: $(STAMP)
	$(PY) -m pip install -q ray==2.60.0
	$(PY) -m optim_lab.lab --out $(OUT)/quick-ray --quick --address local $(LAB_ARGS)

lab-check: $(STAMP)
	$(PY) -m optim_lab.lab --out $(OUT) --check 5

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

## Re-execute notebooks and keep their outputs (the book): every one, or NBS="nbs/28_shampoo.ipynb ..."; commit them after.
outputs: $(STAMP)
	for nb in $(or $(NBS),index.ipynb nbs/*.ipynb); do \
	  env -u MPLBACKEND $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 $$nb || exit 1; \
	done
	$(BIN)/nbdev_clean

## Which committed text output a fresh run no longer prints (numbers within a few percent, timing cells marked
## `#| fresh: skip` exempt), without writing any notebook: every one, or NBS="..."; FRESH_ARGS="--keep DIR" saves the runs.
outputs-check: $(STAMP)
	$(PY) -m optim_lab.freshness $(or $(NBS),index.ipynb nbs/*.ipynb) $(FRESH_ARGS)

## README.md and the HTML book, rendered with nbconvert.
readme: $(STAMP)
	$(PY) -m optim_lab.docs readme

## The book: every notebook as it is committed (nothing is run), with its own MathJax (npm package, pinned in docs.py).
docs: $(STAMP)
	@command -v npm >/dev/null || { echo "make docs: npm is needed to fetch MathJax and is not installed;" \
	  "as root on Debian, make install installs it (or: apt-get install -y npm)"; exit 1; }
	$(PY) -m optim_lab.docs book --out _docs

clean:
	rm -rf _docs .pytest_cache   # lab_results/ is committed: the README quotes it
