# servemesh: `make demo` runs the embedded mesh with example models; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench up clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The torch extra is pinned to the CPU build by the constraints file (no multi-GB CUDA wheels).
	$(PY) -m pip install --quiet -e '.[dev,torch]' -c constraints/cpu.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: $(STAMP)
	$(PY) -m ruff check schemas broker workers router telemetry servemesh tests examples benchmarks
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_mesh.py

up: $(STAMP)
	$(PY) examples/build_models.py .servemesh/models
	$(VENV)/bin/servemesh up --models .servemesh/models

clean:
	rm -rf $(VENV) .servemesh
