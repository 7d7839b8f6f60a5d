# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned only here (the setup path): 2.13.0 is the CPU build these machines carry.
# The project's own ranges stay open for users with CUDA builds.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test install-demo install-test clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip

$(VENV)/.demo-installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e ".[demo]"
	touch $@

$(VENV)/.test-installed: $(VENV)/.demo-installed pyproject.toml
	$(PIP) install --quiet -e ".[test]"
	touch $@

install-demo: $(VENV)/.demo-installed
install-test: $(VENV)/.test-installed

demo: install-demo
	$(VENV)/bin/siren demo

test: install-test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
