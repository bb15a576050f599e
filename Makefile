# make demo   train a small causal linear transformer on MNIST (~5 min), generate digits as an RNN into samples.png
# make test   set up .venv (pinned CPU torch) if needed, lint, run the tests
# make bench  the attention benchmark (paper Fig. 1 on this machine) into results/bench_attention/
# make web    install onnxruntime-web (npm) into web/vendor/ and serve the in-browser demo on localhost
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

WEB_STAMP := web/vendor/.installed
# the browser tests need Node.js; without npm they are skipped (with the reason)
WEB_DEPS := $(if $(shell command -v npm),$(WEB_STAMP),)

.PHONY: test lint bench demo web clean

# torch is pinned here (the CPU wheel lies on these machines); the package itself asks only torch>=2.4.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 -e '.[dev,data,export,hf]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

# onnxruntime-web and playwright-core from the npm registry (versions locked in web/package-lock.json)
$(WEB_STAMP): web/package.json web/package-lock.json web/build.mjs
	cd web && npm ci --no-audit --no-fund && npm run build
	touch $(WEB_STAMP)

test: lint $(WEB_DEPS)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m linear_transformers.bench attention

demo: $(STAMP)
	$(VENV)/bin/linear-transformers demo

web: $(STAMP) $(WEB_STAMP)
	$(VENV)/bin/linear-transformers web

clean:
	rm -rf $(VENV) results runs samples.png .pytest_cache .ruff_cache src/*.egg-info web/node_modules web/vendor
