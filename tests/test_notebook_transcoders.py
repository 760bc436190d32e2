"""Notebook 06 (transcoders, crosscoders and the model diff) runs end to end with small sizes. It has its own file,
so that one of `make test`'s two workers starts on it while the other starts on the other notebooks."""

from tests.notebooks import NOTEBOOKS, run_notebook


def test_notebook_06_runs(tmp_path, monkeypatch):
    (path,) = [p for p in NOTEBOOKS if p.name.startswith("06_")]
    run_notebook(path, tmp_path, monkeypatch)
