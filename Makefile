# Every target works on a fresh clone: the first one that needs the environment builds it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: run test lint install clean

run: $(STAMP)
	$(BIN)/flatstack info grok-1
	$(BIN)/flatstack info grok-1-tiny

test: $(STAMP)
	$(BIN)/ruff check flatstack tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check flatstack tests

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
