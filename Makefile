# All set-up happens here; `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# A CPU wheel of this torch lies on the CI/dev machines; an unpinned torch pulls a multi-GB CUDA build.
# On a machine with its own torch, run `make TORCH_SPEC= test` to keep it.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# tests/browser drives Debian's chromium (through the playwright package, not playwright's own browsers).
CHROMIUM := /usr/bin/chromium

.PHONY: venv chromium test lint demo clean

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
	$(VENV)/bin/lint-imports --no-cache

# As root, install chromium where it is missing; elsewhere say so (the browser test then skips, or fails under CI).
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Installing Debian's chromium for tests/browser"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "note: $(CHROMIUM) is missing and this is not root: install it (sudo apt-get install chromium)" \
			"or tests/browser is skipped (and fails where CI is set)"; \
	fi

test: $(STAMP) lint chromium
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) notebooks/run.py notebooks/quickstart.ipynb notebooks/s1_merge.ipynb notebooks/s2_qlora.ipynb notebooks/s3_load.ipynb notebooks/timeline.ipynb

clean:
	rm -rf $(VENV) build *.egg-info
