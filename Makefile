# Two commands do all the set-up: `make book` builds the book, `make test` runs every test.
# Both create and use the local virtual environment .venv (Python 3.11+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test lab clean

# torch is installed first and pinned: on a machine with the CPU wheel at hand pip takes it,
# while an unpinned torch would pull a CUDA build of several GB.
# The first line stops at once, with a clear message, on a Python older than 3.11.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: the book needs Python 3.11 or newer, but $(PYTHON) is Python %d.%d. Install 3.11+ and name it, e.g. make PYTHON=python3.11 book" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[book,test,lab,flower]"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --all -W -n --keep-going
	@echo "The book is built: open $(CURDIR)/_build/html/index.html"

# The tests run on one worker per core, at most 4 (pytest-xdist): the Flower tests alone take
# about 5 minutes, so more workers would not finish sooner. --dist loadfile keeps each file on one
# worker: a notebook's cells run in order in one kernel, and a module's fixtures are built once.
# OMP_WAIT_POLICY=PASSIVE: a waiting OpenMP thread of torch sleeps instead of spinning. On two
# busy cores that took 100 Adam steps of a small MLP on two threads from 0.73 s to 0.41 s (on
# idle cores it costs: 0.15 s to 0.47 s), and the workers keep the cores busy. Together, on two
# cores: 13 minutes of tests instead of 20. `.venv/bin/python -m pytest tests/test_x.py` runs one
# file in one process.
PYTEST := OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

# Every test: unit tests, docstring examples, notebooks (nbval), the book build, the browser.
test: $(STAMP)
	$(PYTEST)

# The fast loop: unit tests and docstring examples only (no notebook, no book build).
.PHONY: unit
unit: $(STAMP)
	$(PYTEST) -m unit tests companion

lab: $(STAMP)
	$(BIN)/jupyter lab book/

# The chapters for students, solution cells removed and outputs cleared, in _build/student/
# (the rule for solution cells: scripts/student_notebooks.py). Needs only Python, not .venv.
.PHONY: student-notebooks
student-notebooks:
	$(PYTHON) scripts/student_notebooks.py --book book --out _build/student

# Flower: a SuperLink and three SuperNodes on 127.0.0.1 run 3 rounds of DP-FedAvg on the digits,
# checked against the in-process run; prints accuracy and epsilon per round, exits non-zero on
# failure. (The `flower` extra is part of the set-up, so the tests run the Flower apps too.)
.PHONY: flower
flower: $(STAMP)
	$(BIN)/python -m companion.flower

clean:
	rm -rf _build $(VENV)
