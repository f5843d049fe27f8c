# Entry points: `make demo`, `make test` (every test: what CI runs) and `make test-fast` (the
# developer's loop: the tests not marked slow, ray or browser; docs/testing.md). Each creates
# .venv when it is missing and installs the project into it (editable, with its test extras, at
# the tested versions of constraints.txt) when pyproject.toml or constraints.txt changed.
# `make test` also installs Debian's chromium when missing (as root), for the report's browser
# test (.ci/ensure-browser). Both test targets run on TEST_WORKERS processes (pytest-xdist;
# `auto`: one per core; 0: in this process), each test module whole on one of them, so a module's
# fixtures are built once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ens-installed
TEST_WORKERS ?= 2
# pytest exits 5 when no test ran (a wrong -m or path): make fails on it like on a failure.
# Modules are handed to the processes in the order tests/conftest.py gives them: slow ones first.
PYTEST := $(BIN)/python -m pytest --durations=20 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-fast mutate install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	bash .ci/ensure-browser
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not ray and not browser"

demo: $(STAMP)
	$(BIN)/ens demo

# Mutation testing of the pure maths and the format checks ([tool.mutmut] in pyproject.toml;
# docs/testing.md): a fresh mutants/ each run, then the list of the mutants no test killed.
MUTATE_WORKERS ?= 2
mutate: $(STAMP)
	rm -rf mutants
	$(BIN)/mutmut run --max-children $(MUTATE_WORKERS)
	$(BIN)/mutmut results

clean:
	rm -rf .demo build *.egg-info
