# llumigrate: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llumigrate-deps

.PHONY: setup build test test-fast demo bench lint clean

setup: $(STAMP) build

$(STAMP): scripts/bootstrap.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/bootstrap.sh
	touch $(STAMP)

build: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not engine"

demo: setup
	$(PY) -m llumigrate demo

bench: setup
	$(PY) benchmarks/bench_transfer.py --json out/bench_transfer.json
	$(PY) benchmarks/bench_migration.py --json out/bench_migration.json

lint: setup
	$(PY) -m ruff check llumigrate tests benchmarks

clean:
	rm -rf build *.egg-info llumigrate/_C*.so
