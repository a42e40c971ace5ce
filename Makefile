# The two set-up commands: `make conformance` and `make test`. Each creates .venv and installs the
# project with every extra that installs on a CPU machine, pinned by constraints.txt, when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: conformance test lint clean

# MindFormers 2.1.0 declares mindspore~=2.11 (and its whole training stack); its weight conversion code,
# the tests' oracle for MindFormers' layouts, imports with the mindspore 2.10 pinned here once the few
# packages of the `mindformers` extra are in: so it is installed without its declared dependencies.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[all,dev]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt mindformers==2.1.0
	touch $(STAMP)

conformance: $(STAMP)
	$(VENV)/bin/accel conformance

# Two workers, one test file each at a time: many tests wait on subprocesses, ranks and timeouts, so
# on a 2-core machine two files side by side took 464 s where one at a time took 641 s.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check accel backends models conformance tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) reports build *.egg-info
