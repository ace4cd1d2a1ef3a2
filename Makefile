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
# Two pytest sessions, one command: everything but the `serial` tests on 2 workers (most tests
# wait on subprocesses, servers and Airflow imports, so two overlap well on 2 cores; each test
# module stays on one worker, its fixtures made once), then the `serial` tests (tests/test_demo.py,
# which keeps both cores busy on purpose) alone. Modules are handed out in collection order
# (--no-loadscope-reorder): xdist's default, most tests first, left the one-test stack test
# (minutes long) for last, with the other worker idle.
test: $(BIN)/.installed lint
	$(BIN)/pytest -p no:cacheprovider -n 2 --dist loadscope --no-loadscope-reorder -m "not serial"; a=$$?; \
	$(BIN)/pytest -p no:cacheprovider -m serial; b=$$?; \
	test $$a -eq 0 -a $$b -eq 0

clean:
	rm -rf var/demo .pytest_cache
