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

# The oldest releases supported (pyproject's floors, pinned in .ci/floors.txt): `make test-oldest`.
OLDEST := .venv-oldest
OLDEST_PY := $(OLDEST)/bin/python
OLDEST_STAMP := $(OLDEST)/.installed

.PHONY: venv chromium test test-oldest lint demo clean

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

# torch first, from its pin (PyPI's CUDA build of 2.5.1, which runs on the CPU), then the rest at the floors.
$(OLDEST_STAMP): pyproject.toml Makefile .ci/floors.txt
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q -c .ci/floors.txt torch
	$(OLDEST_PY) -m pip install -q -c .ci/floors.txt -e ".[dev]"
	$(OLDEST_PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(OLDEST_STAMP)

# The CPU suite at the floors (the notebook tests included; tests/stack.py says what differs there), then: a
# `pip install .` into that environment changes none of its packages.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -m pytest -q -m "not browser"
	$(OLDEST_PY) .ci/no_upgrade_check.py

demo: $(STAMP)
	$(PY) notebooks/run.py notebooks/quickstart.ipynb notebooks/s1_merge.ipynb notebooks/s2_qlora.ipynb notebooks/s3_load.ipynb notebooks/timeline.ipynb

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info
