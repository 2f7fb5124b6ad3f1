# Two commands on a fresh machine: `make dev` runs the whole system, `make test` tests it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test chromium install lint clean

dev: $(STAMP)
	$(BIN)/outbox dev

# The dashboard's browser test drives Chromium (Playwright never downloads one):
# OUTBOX_TEST_CHROMIUM, else the one on PATH, else Debian's package, installed here
# when apt-get is there and we may use it (root, or sudo without a password).
FIND_CHROMIUM := $${OUTBOX_TEST_CHROMIUM:-$$(command -v chromium || command -v chromium-browser)}

test: $(STAMP) chromium
	OUTBOX_TEST_CHROMIUM="$(FIND_CHROMIUM)" $(BIN)/python -m pytest $(PYTEST_ARGS)

chromium:
	@chromium="$(FIND_CHROMIUM)"; [ -n "$$chromium" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else sudo=none; fi; \
	if ! command -v apt-get >/dev/null || [ "$$sudo" = none ]; then \
		echo "make test needs Chromium for the dashboard's browser test: install it" \
			"(apt-get install chromium on Debian and Ubuntu), or set OUTBOX_TEST_CHROMIUM" \
			"to a Chromium or Chrome binary"; exit 1; fi; \
	echo "== installing Debian's chromium for the dashboard's browser test"; \
	$$sudo apt-get install -y --no-install-recommends chromium || \
		{ $$sudo apt-get update && $$sudo apt-get install -y --no-install-recommends chromium; }

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
