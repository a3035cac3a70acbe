# Two entry points: `make demo` and `make test`. Both set up a fresh machine: .venv, the project, and the
# viewer's scripts from the npm registry; `make test` also installs Debian's chromium for the browser test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VIEWER_ASSETS := .cache/viewer-assets/manifest.json
CHROMIUM := /usr/bin/chromium

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test,ray]"
	touch $(STAMP)

$(VIEWER_ASSETS): exporters/viewer_assets.py $(STAMP)
	$(BIN)/python -m exporters.viewer_assets fetch || echo "viewer scripts not fetched: serve will load them online"

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

install: $(STAMP) $(VIEWER_ASSETS)

demo: install
	$(BIN)/featurestore demo --out demo-output

test: install $(CHROMIUM)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-output .cache
