# make demo   train a small causal linear transformer on MNIST (~5 min), generate digits as an RNN into samples.png
# make test   set up .venv (pinned CPU torch) if needed, lint, run the tests
# make bench  the attention benchmark (paper Fig. 1 on this machine) into results/bench_attention/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint bench demo clean

# torch is pinned here (the CPU wheel lies on these machines); the package itself asks only torch>=2.4.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 -e '.[dev,data]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m linear_transformers.bench attention

demo: $(STAMP)
	$(VENV)/bin/linear-transformers demo

clean:
	rm -rf $(VENV) results runs samples.png .pytest_cache .ruff_cache src/*.egg-info
