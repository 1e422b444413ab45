# Bootstrap: a virtualenv with everything the project needs, then the invoke tasks.
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(not ((3,11) <= sys.version_info[:2] < (3,14)))' >/dev/null 2>&1 \
	&& echo $$p && break; done)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test demo venv lint clean bench proptest

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "needs Python 3.11-3.13" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Run every check CI runs: ruff, mypy --strict, import layers, pytest.
test: $(STAMP)
	$(VENV)/bin/invoke check

## The demo: a throwaway Postgres (or EVENTSTORE_URL), create + init a store, show it.
demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/invoke lint typecheck

proptest: $(STAMP)
	$(VENV)/bin/invoke proptest

bench: $(STAMP)
	$(VENV)/bin/invoke bench

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .pytest_cache .ruff_cache .hypothesis
