# Two commands on a fresh machine: `make dev` runs the whole system, `make test` tests it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test install lint clean

dev: $(STAMP)
	$(BIN)/outbox dev

# The dashboard's browser test drives this Chromium (Playwright never downloads one).
CHROMIUM ?= $(or $(OUTBOX_TEST_CHROMIUM),$(shell command -v chromium || command -v chromium-browser))

test: $(STAMP)
	@test -n "$(CHROMIUM)" || { echo "make test needs Chromium for the dashboard's browser" \
		"test: apt-get install chromium (Debian, Ubuntu), or set OUTBOX_TEST_CHROMIUM to a" \
		"Chromium or Chrome binary"; exit 1; }
	OUTBOX_TEST_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .outbox-dev .outbox-chaos .pytest_cache .mypy_cache .ruff_cache *.egg-info
