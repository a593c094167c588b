# Two commands do all the set-up: `make book` builds the book, `make test` runs every test.
# Both create and use the local virtual environment .venv (Python 3.11+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test lab clean

# torch is installed first and pinned: on a machine with the CPU wheel at hand pip takes it,
# while an unpinned torch would pull a CUDA build of several GB.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[book,test,lab]"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --all -W -n --keep-going
	@echo "The book is built: open $(CURDIR)/_build/html/index.html"

# Every test: unit tests, docstring examples, notebooks (nbval), the book build, the browser.
test: $(STAMP)
	$(BIN)/python -m pytest

# The fast loop: unit tests and docstring examples only (no notebook, no book build).
.PHONY: unit
unit: $(STAMP)
	$(BIN)/python -m pytest -m unit tests companion

lab: $(STAMP)
	$(BIN)/jupyter lab book/

clean:
	rm -rf _build $(VENV)
