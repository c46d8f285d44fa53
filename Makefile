# Two entry points (see README): `make run` and `make test`. Both set up first.
# Setup is stamped on pyproject.toml: nothing is re-installed when nothing changed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOB ?= jobs/fe_hte_quickstart.yaml
export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_V2_ENABLED ?= 1

.PHONY: setup run test test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/dhte run $(JOB)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

lint: setup
	$(BIN)/ruff check distributed_hte tests benchmarks
	$(BIN)/ruff format --check distributed_hte tests benchmarks

clean:
	rm -rf runs .pytest_cache
