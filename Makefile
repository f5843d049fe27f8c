# Two entry points: `make demo` and `make test`. Both create .venv when it is missing and
# install the project into it (editable, with its test extras, at the tested versions of
# constraints.txt) when pyproject.toml or constraints.txt changed.
# `make test` also installs Debian's chromium when missing (as root), for the report's browser
# test (.ci/ensure-browser).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ens-installed

.PHONY: demo test install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	bash .ci/ensure-browser
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/ens demo

clean:
	rm -rf .demo build *.egg-info
