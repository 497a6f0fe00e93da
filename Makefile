# Two commands for a newcomer: `make run` and `make test`. Both create .venv and install the pinned set.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: install run train test lint ui clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## train the default config, gate it, batch-score held-out rows, print one summary
	$(BIN)/torchcycle run --config configs/digits_cnn.yaml

test: $(STAMP)  ## the whole suite
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: $(STAMP)
	$(BIN)/torchcycle ui

clean:
	rm -rf $(VENV) .prefect .pytest_cache mlflow/mlflow.db mlflow/artifacts cache checkpoints
