# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/robustsparse demo

test: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/python -m pytest
