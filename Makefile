# All set-up happens here; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# A CPU wheel of this torch lies on the CI/dev machines; an unpinned torch pulls a multi-GB CUDA build.
# On a machine with its own torch, run `make TORCH_SPEC= test` to keep it.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check vram_magic tests benchmarks notebooks docs
	$(VENV)/bin/ruff format --check vram_magic tests benchmarks notebooks docs
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) notebooks/run.py notebooks/quickstart.ipynb

clean:
	rm -rf $(VENV) build *.egg-info
