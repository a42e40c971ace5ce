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

# Two workers, one test file each at a time: many tests wait on subprocesses, ranks and timeouts, so
# on a 2-core machine two files side by side took 464 s where one at a time took 641 s.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check accel backends models conformance tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) reports build *.egg-info
