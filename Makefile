# Each target sets up .venv (and the offline demo data) first, so on a fresh machine it is the whole set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package when we can install it; otherwise the demo falls back to the hub.
$(FASHION_MNIST):
	-(command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null))) || \
	  echo "dataset-fashion-mnist not installed: the demo will try the Hugging Face hub"

setup: $(STAMP) $(FASHION_MNIST)

# The offline demo: small CLIP and LLaVA trained here on Fashion-MNIST's train split (committed under
# cascadevlm/zoo/checkpoints; `python -m cascadevlm.zoo.pretrain` remakes them), its test split evaluated.
demo: setup
	$(PY) evaluate.py --config configs/demo.yaml

test: setup
	$(PY) -m pytest -q tests

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check cascadevlm tests bench *.py

clean:
	rm -rf runs artifacts lightning_logs
