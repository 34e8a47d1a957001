# The two set-up commands of README.md. Each creates .venv when missing and installs the project.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# A fresh 12-trial study on a tiny offline pipeline; `run` ends by printing `study show`. Then
# a 12-trial study of diffusers' caches on a tiny FLUX, against the fewer-steps line, and a
# 10-trial video study of the video caches on a tiny Wan (about 3 minutes in all on 2 cores).
demo: $(STAMP)
	rm -rf demo.db demo.db-wal demo.db-shm search_params.json artifacts studies/artifacts
	$(BIN)/optsearch run studies/tiny-demo.toml --storage sqlite:///demo.db --confirm 2
	$(BIN)/optsearch study export tiny-demo --storage sqlite:///demo.db -o search_params.json
	$(BIN)/optsearch run studies/tiny-flux.toml --storage sqlite:///demo.db --quiet
	$(BIN)/optsearch run studies/tiny-wan.toml --storage sqlite:///demo.db --quiet
	@echo "Watch it: $(BIN)/optsearch dashboard --storage sqlite:///demo.db"

# Two tests at a time, one core each (tests/conftest.py); `pytest -q` alone runs them one by one.
test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check optsearch tests benchmarks
