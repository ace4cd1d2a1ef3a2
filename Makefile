# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Each creates the venv and installs the pinned dependencies first (constraints.txt).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,runtimes]'
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/brandmon demo --workdir var/demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# Postgres and the S3 API server are started by the test session itself unless
# BRANDMON_TEST_PG_URL / BRANDMON_TEST_S3_ENDPOINT point at running ones (CI does that).
test: $(BIN)/.installed lint
	$(BIN)/pytest -p no:cacheprovider

clean:
	rm -rf var/demo .pytest_cache
