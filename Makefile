# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INDEX_DIR ?= data/demo-index
PORT ?= 8000
DEMO_IMAGES ?= data/demo-images
# The FAISS build: gpu where nvidia-smi finds a GPU, else cpu (override: make run FAISS=cpu).
FAISS ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
OTHER_FAISS := $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu)
STAMP := $(VENV)/.installed-$(FAISS)

.PHONY: run test test-all install demo-index serve bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Both builds install the `faiss` module: the other one goes first, or the two would mix files.
	$(PY) -m pip uninstall -q -y $(OTHER_FAISS) 2>/dev/null || true
	$(PY) -m pip install -q -e '.[dev,$(FAISS)]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Serve in the foreground: the demo index (built when missing), or with IMAGES=FOLDER the index of
# your own photos (built when missing or when the folder changed; in data/indexes/ unless INDEX_DIR).
run: $(STAMP)
ifdef IMAGES
	$(PY) -m deployments run --images "$(IMAGES)" --port $(PORT) $(if $(filter command line environment,$(origin INDEX_DIR)),--index-dir "$(INDEX_DIR)")
else
	@test -f $(INDEX_DIR)/manifest.json || $(MAKE) demo-index
	$(PY) -m deployments run --index-dir $(INDEX_DIR) --port $(PORT)
endif

demo-index: $(STAMP)
	$(PY) -m indexing demo-images --out $(DEMO_IMAGES)
	$(PY) -m indexing build --images $(DEMO_IMAGES) --index-dir $(INDEX_DIR) --shards 2

# The default suite (what a contributor runs); test-all adds the `slow` soak and multi-node drills (CI).
test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench,$(FAISS)]'
	$(PY) -m bench all --out bench/results --quick

clean:
	rm -rf $(VENV) data/demo-index data/demo-images
