# The two commands a newcomer needs (see README):
#   make repro   install everything into .venv (once), then run the whole DVC pipeline
#   make test    install everything into .venv (once), then run the test suite
# Installing is skipped when pyproject.toml and requirements.lock have not changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALL_KEY := $(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(INSTALL_KEY)
PYTEST_ARGS ?=
PIPELINE ?= dvc.yaml

.PHONY: setup repro test test-all mlflow-ui app sweep clean-outputs help

help:
	@echo "make repro     - install (once) and run the default pipeline with 'dvc repro dvc.yaml' (with Ray"
	@echo "                 workers in the params, one Ray instance for all its stages; DVC_ARGS=--force reruns every stage)"
	@echo "                 (PIPELINE=pipelines/sketchy-mini/dvc.yaml for a real-data pipeline)"
	@echo "make test      - install (once) and run the test suite (slow tests excluded; make test-all for all)"
	@echo "make mlflow-ui - open the MLflow UI on the project's store (http://127.0.0.1:5000)"
	@echo "make app       - draw a sketch and search photos with the trained models (http://127.0.0.1:8000;"
	@echo "                 APP_ARGS='--port 8080 --model ID=CHECKPOINT --gallery ID=PATH', see sbir app --help)"
	@echo "make sweep SWEEP=estimator_weights - Ray Tune sweep of pipelines/sweeps/<SWEEP>.yaml (docs/sweeps.md)"

# pip's output goes to a log (this machine's pip config alone adds ~250 warning lines about index folders
# it cannot find); a failed install prints the log's tail and stops.
$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned packages into $(VENV) (once; log: $(VENV)/install.log)"
	@$(BIN)/python -m pip install -c requirements.lock -e ".[dev]" > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "pip install failed: the whole log is $(VENV)/install.log"; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

setup: $(STAMP)

# One Ray instance for the whole run (sbir.train.shared_ray): every training stage joins it instead of starting
# its own; it stops when dvc does, failed or not. None when the params run the stages in Ray Train's local
# mode (ray.num_workers: 0, the default on a 2-core machine) or on a cluster (ray.address).
repro: $(STAMP)
	@export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	head=$$($(BIN)/python -m sbir.train.shared_ray start --params $(dir $(PIPELINE))params.yaml) || exit 1; eval "$$head"; \
	trap '$(BIN)/python -m sbir.train.shared_ray stop' EXIT; \
	$(BIN)/dvc repro $(PIPELINE) $(DVC_ARGS)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# The runs table in the model-training view (MLflow 3's UI opens experiments in its GenAI view unless its
# workflow toggle says "machine learning": the printed link sets it); one parent run per `dvc repro`.
mlflow-ui: $(STAMP)
	@echo "MLflow UI: $$(SBIR_MLFLOW_URI= $(BIN)/python -c 'from sbir.tracking import experiment_ui_url as u; print(u("embedded-default"))')"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

# The draw-and-search page (docs/app.md) on the default outputs of `make repro`; APP_ARGS pass on to `sbir app`.
APP_ARGS ?=
app: $(STAMP)
	$(BIN)/sbir app $(APP_ARGS)

# A Ray Tune sweep (docs/sweeps.md): results, best_params.yaml and best_overrides.txt land in
# ray_results/sweeps/<SWEEP>/; SWEEP_ARGS="--set ray.use_gpu=true" etc. pass on to python -m sbir.sweep.
SWEEP ?= estimator_weights
SWEEP_ARGS ?=
sweep: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m sbir.sweep pipelines/sweeps/$(SWEEP).yaml $(SWEEP_ARGS)
