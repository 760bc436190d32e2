"""Every notebook runs end to end (with small sizes), so the documentation cannot rot; 06, the longest (about three
minutes), runs from `test_notebook_transcoders.py`."""

import pytest

from tests.notebooks import NOTEBOOKS, run_notebook

REST = [p for p in NOTEBOOKS if not p.name.startswith("06_")]


@pytest.mark.parametrize("path", REST, ids=[p.name for p in REST])
def test_notebook_runs(path, tmp_path, monkeypatch):
    run_notebook(path, tmp_path, monkeypatch)
