# yugami: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
DEMO_VENV ?= .venv-demo
PIP_FLAGS ?= --disable-pip-version-check -q

.PHONY: demo test lint unit integration bench clean help

help:
	@echo "make demo   set up an agent-only venv ($(DEMO_VENV), no TensorFlow) and run the demo"
	@echo "make test   set up the dev venv ($(VENV)), lint, and run the whole test suite"
	@echo "make lint   ruff over the project"
	@echo "make bench  run the benchmarks (see bench/README.md)"

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install $(PIP_FLAGS) -e '.[demo]'
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[dev]'
	touch $@

demo: $(DEMO_VENV)/.installed
	PATH="$(CURDIR)/$(DEMO_VENV)/bin:$$PATH" $(DEMO_VENV)/bin/python -m demo.run

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
		{ echo "mosquitto is not installed: apt-get install mosquitto mosquitto-clients (or run .ci/run)"; exit 1; }
	TF_CPP_MIN_LOG_LEVEL=2 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m pytest -q

unit: $(VENV)/.installed
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python -m pytest -q tests/unit

integration: $(VENV)/.installed
	TF_CPP_MIN_LOG_LEVEL=2 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m pytest -q tests/integration

clean:
	rm -rf $(VENV) $(DEMO_VENV) build *.egg-info .pytest_cache .ruff_cache
