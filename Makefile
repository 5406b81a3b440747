# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A pinned torch first: unpinned, pip resolves torch to a multi-gigabyte CUDA build. DeepSpeed
# builds against the installed torch (no isolated build env, which would fetch another torch).
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
# Type-checked strictly: the whole of both packages.
MYPY_TARGETS := trainer/pretrain_trainer operator/pretrain_operator

.PHONY: demo test lint typecheck unit crd venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) '$(TORCH_SPEC)'
	$(PIP) --no-build-isolation 'deepspeed==0.19.8'
	$(PIP) -e '.[dev,trainer]'
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
