# Every target installs what it needs into .venv first (torch's CPU wheel, then saelab with its dev extras).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: install browser test quickstart bench

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(VENV_STAMP)

install: $(VENV_STAMP)

# Headless Chromium and its driver for the app's browser tests (Debian packages).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

test: $(VENV_STAMP) browser
	$(PY) -m pytest -q

quickstart: $(VENV_STAMP)
	.venv/bin/saelab quickstart

bench: $(VENV_STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) scripts/bench_harvest.py --json runs/bench_harvest.json
	$(PY) scripts/bench_train.py --json runs/bench_train.json
