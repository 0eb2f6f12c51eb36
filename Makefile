# Two commands for a fresh machine: `make test` and `make profile`.
# Both create .venv on first use (`make setup`), which is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test profile clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[models,plot,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

profile: $(STAMP)
	$(PY) -m mutwo_backend profile

clean:
	rm -rf $(VENV) *.egg-info
