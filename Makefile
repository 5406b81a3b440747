# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# Pure modules type-checked strictly (no torch, no cluster I/O).
MYPY_TARGETS := trainer/pretrain_trainer/config trainer/pretrain_trainer/contract.py \
	operator/pretrain_operator

.PHONY: demo test lint typecheck unit crd venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pretrainctl validate examples/tiny-cpu.yaml examples/gpu-1node.yaml \
		examples/deepseek-3stage.yaml

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy $(MYPY_TARGETS)

unit: $(STAMP)
	$(BIN)/pytest

# Regenerate the committed CRD after changing the API models.
crd: $(STAMP)
	$(BIN)/pretrainctl crd --output crds/pretrainjob.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
