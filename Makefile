# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv if missing, installs the project, runs the offline recipe end to end
#   make test   same environment, runs the linter and the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11); set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,sam]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline run examples/quickstart.yaml
	$(PY) -m pipeline status examples/quickstart.yaml

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf outputs .pytest_cache
