# Shortcuts for the README's commands; scripts/bootstrap.sh does the (idempotent) setup.
JOB ?= jobs/fe_hte_quickstart.yaml

.PHONY: setup run test test-all lint clean

setup:
	bash scripts/bootstrap.sh

run: setup
	.venv/bin/dhte run $(JOB)

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m ''

lint: setup
	.venv/bin/ruff check distributed_hte tests benchmarks
	.venv/bin/ruff format --check distributed_hte tests benchmarks

clean:
	rm -rf runs .pytest_cache
