# `make demo` and `make test` each bring their own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/agi-bitrix demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/agi_event.py
	$(BIN)/python bench/fastagi.py
	$(BIN)/python bench/journal_cost.py
	$(BIN)/python bench/requests_per_call.py
	$(BIN)/python bench/dialer_requests.py
	$(BIN)/python bench/answer_step.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
