# `make demo` and `make test` work on a fresh machine: they create .venv, install torch==2.13.0
# when no torch is importable there (the development machines' index serves its CPU build; on a
# GPU machine install your CUDA build into .venv first and it is kept), then the package.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m stage_dist.demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

# ruff (pyflakes, import order, pycodestyle, 120 columns) and mypy, both configured in pyproject.toml;
# mypy runs even when ruff fails, so one run shows every problem
lint: $(STAMP)
	$(PY) -m ruff check .; status=$$?; $(PY) -m mypy || status=1; exit $$status

bench: $(STAMP)
	for b in bench/*_bench.py; do $(PY) -m bench.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(VENV) demo_out bench_out
