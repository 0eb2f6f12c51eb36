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

# ResNet-152 at batch 32 on a GPU, batch 2 on a CPU-only machine (about 30 s on 2 cores)
profile: $(STAMP)
	$(PY) -m mutwo_backend profile --model resnet152 --out mutwo_report

clean:
	rm -rf $(VENV) *.egg-info
