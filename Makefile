# Two commands on a fresh machine with Python 3.11:
#   make demo           installs the runtime and serves the Space locally (model: $CATDOG_MODEL or the Hub)
#   make demo-offline   the same without the Hub: trains the mini-set model once, then serves it
#   make test           installs the test tools (and Debian's chromium for the browser test) and runs every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-offline test test-fast train-mini clean chromium

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) app.py

demo-offline: $(VENV)/.runtime catdog-model/config.json
	HF_HUB_OFFLINE=1 $(PY) app.py --model catdog-model

catdog-model/config.json:
	$(MAKE) train-mini

chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install chromium: the browser test will be skipped"

test: $(VENV)/.dev chromium
	$(PY) -m pytest

test-fast: $(VENV)/.dev
	$(PY) -m pytest -m "not slow"

# A small model on the offline mini dataset, for `CATDOG_MODEL=catdog-model make demo`.
train-mini: $(VENV)/.runtime
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) train_accelerate.py --dataset ../shared/data/cats_vs_dogs_mini --output-dir catdog-model \
	  --image-size 128 --epochs 2 --no-pretrained --overwrite-output-dir

clean:
	rm -rf $(VENV) .pytest_cache
