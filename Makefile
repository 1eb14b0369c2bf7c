# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test lint typecheck unit test-vsock bench bench-quick bench-vsock soak clean

# editable_mode=compat: the editable install is a plain path entry (.pth), not an import hook,
# so type checkers (mypy, pyright) see vrpc from any folder, and new modules need no reinstall.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]' --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m services.demo $(if $(VSOCK),--vsock,)

lint: $(STAMP)
	$(VENV)/bin/ruff check vrpc services tests benchmarks
	$(VENV)/bin/ruff format --check vrpc services tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict vrpc services

unit: $(STAMP)
	$(PY) -m pytest -q -m "not vsock" $(PYTEST_ARGS)

# Real AF_VSOCK runs only inside a throwaway VM (scripts/vsock-lab): this machine's vsock is not ours.
test-vsock: $(STAMP)
	scripts/vsock-lab $(PY) -m pytest -q -m vsock -p no:cacheprovider tests/vsock

test: lint typecheck unit test-vsock

bench: $(STAMP)
	$(PY) -m benchmarks

# Writes to $$VRPC_BENCH_OUT or a fresh temporary directory (printed), never the committed results.
bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

# vrpc vs raw echo ratios over real AF_VSOCK, both event loops, inside the vsock lab VM.
bench-vsock: $(STAMP)
	VSOCK_LAB_TIMEOUT=$(or $(VSOCK_LAB_TIMEOUT),900) scripts/vsock-lab $(PY) -m benchmarks.vsock_lab

soak: $(STAMP)
	$(PY) -m tests.soak --seconds $(or $(SECONDS),180)

clean:
	rm -rf $(VENV) build *.egg-info
