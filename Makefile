# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned only here (the setup path): 2.13.0 is the CPU build these machines carry.
# The project's own ranges stay open for users with CUDA builds.
TORCH_PIN ?= torch==2.13.0

# The real Triton server for the tests: the nvidia-pytriton wheel carries tritonserver 2.51
# and the Python backend; it is unpacked (not installed: it would pin numpy<2 here), and the
# models get their own environment, as on a real server.
TRITON_HOME ?= .cache/tritonserver
PYTRITON ?= nvidia-pytriton==0.7.0

.PHONY: demo test docs install-demo install-test triton-server gpu-kit clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip

$(VENV)/.demo-installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet --quiet -e ".[demo]"
	touch $@

$(VENV)/.test-installed: $(VENV)/.demo-installed pyproject.toml
	$(PIP) install --quiet --quiet -e ".[test]"
	touch $@

$(TRITON_HOME)/.ready: pyproject.toml
	rm -rf $(TRITON_HOME) && mkdir -p $(TRITON_HOME)/wheel
	$(PIP) download --quiet --no-deps --dest $(TRITON_HOME)/wheel "$(PYTRITON)"
	$(PY) -m zipfile -e $(TRITON_HOME)/wheel/*.whl $(TRITON_HOME)
	chmod +x $(TRITON_HOME)/pytriton/tritonserver/bin/tritonserver $(TRITON_HOME)/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
	$(PYTHON) -m venv $(TRITON_HOME)/venv
	$(TRITON_HOME)/venv/bin/pip install --quiet "numpy<2" "onnxruntime>=1.18" "tokenizers>=0.20" "jinja2>=3.1.6"
	$(TRITON_HOME)/venv/bin/pip install --quiet --quiet --no-deps -e .
	rm -rf $(TRITON_HOME)/wheel
	touch $@

install-demo: $(VENV)/.demo-installed
install-test: $(VENV)/.test-installed
triton-server: $(TRITON_HOME)/.ready

demo: install-demo
	$(VENV)/bin/siren demo --workdir demo

# The docs site: reference pages generated from the code, then a strict build (a broken link fails).
docs: install-test
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Two workers (this project's machines have 2 cores): a test module runs whole on one worker,
# the shared fixtures are built once for both (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install-test triton-server docs
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The offline GPU check's kit (benchmarks/gpu_offline): wheels + a tiny bundle, under 60 MiB,
# for a CUDA box without network (its Python: KIT_PYTHON). Copy dist/gpu-check there and run
# `bash run.sh`.
KIT_PYTHON ?= 3.12
gpu-kit: install-test
	$(PY) benchmarks/gpu_offline/make_kit.py -o dist/gpu-check --python $(KIT_PYTHON)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .cache demo site
