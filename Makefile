# The two set-up commands: `make conformance` and `make test`. Each creates .venv and installs the
# project with every extra that installs on a CPU machine, pinned by constraints.txt, when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: conformance test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

conformance: $(STAMP)
	$(VENV)/bin/accel conformance

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check accel backends models conformance tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) reports build *.egg-info
