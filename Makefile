# Two entry points for a fresh clone: `make demo` (the main job on the embedded defaults) and
# `make test`. Both create .venv and install what they need once; later runs reuse it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.finescope-installed
OUT    ?= out/demo
# image tags carry the package version; deployments/prefect.yaml names the same tags
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: install demo test lint bench images

install: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first, pinned: otherwise a resolver may pull a newer CUDA build
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
	touch $(STAMP)

demo: install
	$(VENV)/bin/finescope demo --config configs/demo.yaml --out $(OUT)

test: install
	$(VENV)/bin/ruff format --check finescope_core tasks flows tests bench
	$(VENV)/bin/ruff check finescope_core tasks flows tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff format --check finescope_core tasks flows tests bench
	$(VENV)/bin/ruff check finescope_core tasks flows tests bench
	$(VENV)/bin/mypy

# the images of the docker work pools (deployments/prefect.yaml); needs a Docker daemon, not the venv
images:
	docker build -f docker/Dockerfile.cpu -t finescope:$(VERSION)-cpu .
	docker build -f docker/Dockerfile.cuda -t finescope:$(VERSION)-cuda .

bench: install
	$(PY) bench/bench_saliency.py
	$(PY) bench/bench_embedding.py
	$(PY) bench/bench_retrieval.py
	$(PY) bench/bench_sae.py
	$(PY) bench/bench_prune.py
	$(PY) bench/bench_fanout.py
