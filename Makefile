# Two commands on a fresh machine: `make run` (the pipeline on the built-in scenes) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ROOT ?= data
CONFIG ?= configs/scenes.yaml
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 300

.PHONY: run test check setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision are pinned; pip takes the 2.14.1 wheels from the local disk where present
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/tf pipeline --config $(CONFIG) --root $(ROOT)

test: $(STAMP)
	bash dashboards/ensure_chromium.sh
	$(BIN)/python -m pytest -q

# the edit-test loop: the pure-math and storage tests (no Prefect server, no pipeline runs), not the slow ones
check: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests/models tests/storage

clean:
	rm -rf $(ROOT) .prefect
