# Two commands on a fresh machine with Python 3.11:
#   make demo           installs what the Space installs (no torch) and serves the Space on http://127.0.0.1:7860.
#                       With no model to serve (none named, no ./catdog-model, the published one out of reach), it
#                       first trains a quick demo model into ./catdog-model: a fine-tune from microsoft/cats_vs_dogs
#                       where the Hub answers, else from scratch on a local copy of it (DATASET=path).
#   make test           installs the test tools (and Debian's chromium for the browser test) and runs every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# A local copy of microsoft/cats_vs_dogs in the Hub's layout (README.md, "Set up in two commands"); the project's machines have one here.
DATASET ?= $(wildcard ../shared/data/cats_vs_dogs_mini)
# The quick demo models: minutes on a laptop CPU.
QUICK_HUB := --dataset microsoft/cats_vs_dogs --freeze-backbone --max-train-samples 2000 --max-eval-samples 400 --epochs 2
QUICK_LOCAL = --dataset $(DATASET) --no-pretrained --image-size 128 --epochs 2

.PHONY: demo demo-offline demo-model test test-fast clean chromium

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.train: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install --quiet -e ".[train]"
	touch $@

$(VENV)/.dev: $(VENV)/.train requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps olah==0.5.4  # why --no-deps: requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	@$(PY) app.py --check || $(MAKE) --no-print-directory demo-model
	$(PY) app.py

demo-offline: demo  # the same: without the Hub, `make demo` trains on the local copy by itself

# A quick model into ./catdog-model, by the route this machine allows, said in one line.
demo-model: $(VENV)/.runtime
	@if $(PY) -c 'from catdog_model.serving.files import hub_reachable; raise SystemExit(not hub_reachable())'; then \
	  echo "demo: fine-tuning a quick model from microsoft/cats_vs_dogs with ImageNet weights into ./catdog-model"; \
	  $(MAKE) --no-print-directory $(VENV)/.train && $(PY) train_accelerate.py $(QUICK_HUB) --overwrite-output-dir; \
	elif [ -n "$(DATASET)" ] && [ -d "$(DATASET)" ]; then \
	  echo "demo: the Hub does not answer; training a small model from scratch on $(DATASET) into ./catdog-model"; \
	  $(MAKE) --no-print-directory $(VENV)/.train && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	    $(PY) train_accelerate.py $(QUICK_LOCAL) --overwrite-output-dir; \
	else \
	  echo "demo: no model to serve, the Hub does not answer, and no local copy of the dataset: connect, or pass" \
	    "DATASET=path/to/cats_vs_dogs (README.md, \"Set up in two commands\")" >&2; exit 1; \
	fi

chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install chromium: the browser test will be skipped"

test: $(VENV)/.dev chromium
	$(PY) -m pytest

test-fast: $(VENV)/.dev
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
