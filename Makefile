# Every target installs what it needs into .venv first (torch's CPU wheel, then saelab with its dev extras).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: install browser lint test quickstart bench bench-analysis

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

# ruff (lint with isort, and the formatter's check) and basedpyright (basic), as CI runs them before the tests.
lint: $(VENV_STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/basedpyright --pythonpath $(PY)

test: $(VENV_STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

quickstart: $(VENV_STAMP)
	.venv/bin/saelab quickstart

bench: $(VENV_STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) scripts/bench_harvest.py --json runs/bench_harvest.json
	$(PY) scripts/bench_train.py --json runs/bench_train.json

# sae-dashboard, the anchor of scripts/bench_analysis.py, needs transformer-lens 2.x, so it gets its own venv.
# Its dependency decode-clt pulls torchvision and torchaudio wheels built for another torch; nothing uses them.
SD_VENV := .venv/sae-dashboard
$(SD_VENV)/.installed:
	python3 -m venv $(SD_VENV)
	$(SD_VENV)/bin/python -m pip install -q torch==2.13.0
	$(SD_VENV)/bin/python -m pip install -q torch==2.13.0 sae-dashboard==0.8.0 "numpy<2" "pyarrow<21"
	$(SD_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio
	touch $@

bench-analysis: $(VENV_STAMP) $(SD_VENV)/.installed
	mkdir -p runs
	$(PY) scripts/bench_analysis.py --sd-python $(SD_VENV)/bin/python --json runs/bench_analysis.json
