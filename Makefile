# The two commands: `make run` (main job on the embedded default) and `make test`.
# bash: the postgres target uses compgen
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean postgres

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: anything else would let pip pick a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/metacompress run

# PostgreSQL's server, for tests/test_tracking_server.py (Debian's package; that test fails naming the fix when the
# install could not run, so the other tests still do).
postgres:
	@compgen -G "/usr/lib/postgresql/*/bin/postgres" > /dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null; } || \
	  echo "make: could not install postgresql; tests/test_tracking_server.py will fail" >&2

test: $(STAMP) postgres
	# The layers of docs/design.md §2: an import that breaks them fails here, naming the import.
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=30

bench: $(STAMP)
	$(BIN)/metacompress bench reducer

clean:
	rm -rf $(VENV) .pytest_cache
