# `make demo` and `make test` each bring their own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test bench clean browser postgresql

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/agi-bitrix demo

test: $(BIN)/.installed browser postgresql
	$(BIN)/python -m pytest -q

# The widget tests drive the system's Chromium (Playwright downloads no browser). On a fresh
# machine it is installed from the distribution when we are root; otherwise the run stops here.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Chromium for the widget tests (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  fi; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "make test: Chromium is missing and could not be installed: run 'apt-get install chromium' as root" >&2; \
	  exit 1; }

# The shared store's tests start a throwaway PostgreSQL from Debian's server package (the psql client
# alone is not enough); installed when we are root and it is missing.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing PostgreSQL for the shared-store tests (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  fi; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "make test: PostgreSQL's server is missing and could not be installed: run 'apt-get install postgresql' as root" >&2; \
	  exit 1; }

bench: $(BIN)/.installed postgresql
	$(BIN)/python bench/agi_event.py
	$(BIN)/python bench/fastagi.py
	$(BIN)/python bench/journal_cost.py
	$(BIN)/python bench/requests_per_call.py
	$(BIN)/python bench/delivery.py
	$(BIN)/python bench/db_growth.py
	$(BIN)/python bench/dialer_requests.py
	$(BIN)/python bench/answer_step.py
	$(BIN)/python bench/shared_store.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
