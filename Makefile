# Two commands from a fresh clone:  `make run` (the pipeline on Fashion-MNIST)  and  `make test`.
# Each creates .venv and installs what it needs; nothing has to be installed by hand.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
INSTALL_GIB := 7

.PHONY: run test test-fast install dataset bench clean

# The install needs INSTALL_GIB free (PyTorch's CUDA build and its libraries, which also run on the CPU): say so first
# when the disk has less free, rather than leave pip's 'No space left on device' half-way through.
$(STAMP): pyproject.toml constraints.txt
	@free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); if [ "$$free" -lt $(INSTALL_GIB) ]; then \
		echo "warning: $$free GiB free on this disk; the install needs about $(INSTALL_GIB) GiB" >&2; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[pipeline,serve,test]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's package; without apt, root or a reachable mirror the loader falls back to
# torchvision's download (and says so if that fails too).
dataset:
	@if [ ! -d $(FASHION_DIR) ]; then \
		if ! command -v apt-get >/dev/null 2>&1; then reason="apt-get is not available"; \
		elif [ "$$(id -u)" != 0 ]; then reason="installing dataset-fashion-mnist needs root"; \
		elif DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; then reason=""; \
		else reason="apt-get could not install dataset-fashion-mnist"; fi; \
		if [ -n "$$reason" ]; then \
			echo "note: $(FASHION_DIR) is missing ($$reason); Fashion-MNIST will be downloaded if possible"; fi; \
	fi

# The DVC pipeline (dvc.yaml, docs/pipeline.md); the stages run `python`, so .venv/bin goes first on PATH.
# It ends with the summary block of pipelines/summary.py; every metric: `.venv/bin/dvc metrics show`.
run: $(STAMP) dataset
	@$(PY) -c 'from pipelines.common import run_stage; run_stage("params.yaml", lambda cfg: None)'  # also when up to date
	PATH="$(abspath $(VENV))/bin:$$PATH" MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} $(VENV)/bin/dvc repro
	@$(PY) -m pipelines.summary

test: $(STAMP) dataset
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest -q

test-fast: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest -q -m "not slow"

bench: $(STAMP) dataset
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
