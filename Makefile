# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv if missing, installs the project, runs the offline recipe end to end
#               (data pipeline, then MFPO training of a tiny model)
#   make test   same environment, runs the linter and the whole test suite
#   (make test-fast: the linter and the fast tier, in under 2 minutes)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

GDINO_VENV ?= .venv-groundingdino
GDINO_STAMP := $(GDINO_VENV)/.installed-stamp

.PHONY: demo test test-fast lint install clean groundingdino-env browser

install: $(STAMP)

# constraints.txt pins every package to the versions CI runs; pyproject.toml only bounds them.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11 or later); set PYTHON=/path/to/python3"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,sam,spacy]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/make_tiny_vlm.py outputs/models/tiny-llava
	$(PY) -m pipeline run examples/quickstart.yaml
	$(PY) -m pipeline status examples/quickstart.yaml
	$(PY) -m pipeline train examples/quickstart.yaml --resume
	$(PY) -m pipeline eval examples/quickstart.yaml
	$(PY) -m pipeline preview examples/quickstart.yaml

lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# The original GroundingDINO package needs transformers < 5: it gets an environment of its own, which the
# `groundingdino-py` ground backend runs as a worker process (stages.ground.groundingdino_py.python).
groundingdino-env: $(GDINO_STAMP)

$(GDINO_STAMP):
	test -x $(GDINO_VENV)/bin/python || $(PYTHON) -m venv $(GDINO_VENV)
	$(GDINO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GDINO_VENV)/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" "transformers==4.57.6" \
		"groundingdino-py==0.4.0" "safetensors>=0.4"
	touch $(GDINO_STAMP)

# The preview page is checked in a real headless browser: Debian's chromium and chromedriver, installed where
# apt-get can (root); elsewhere that one test is skipped with the reason printed.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromedriver (apt-get) for the preview page test"; \
		{ apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; } || \
		echo "could not install chromium: the browser test will be skipped"; \
	else echo "no chromium and no apt-get as root: the browser test will be skipped"; fi

test: lint groundingdino-env browser
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The fast tier, for every change: no subprocess CLI, no Ray, no model beyond the tiny fixtures (under 2 minutes).
test-fast: lint
	$(PY) -m pytest -q -m "not slow" --durations=10

clean:
	rm -rf outputs .pytest_cache
