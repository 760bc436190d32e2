"""The app as a whole, over a run that saelab harvests, trains and analyses here (`run_dir`): routing, bad
requests and broken run directories in headless Chromium, `saelab serve`, and the WSGI entry point for a production
server (`saelab.dashboards.wsgi.create`)."""

from __future__ import annotations

import gc
from pathlib import Path

import dash
import flask
import pytest
from selenium.webdriver.common.by import By
from typer.testing import CliRunner

from saelab.cli import app as cli
from saelab.dashboards import wsgi
from saelab.errors import ConfigError, MissingError
from tests.dashboards.helpers import OTHER, Server, feature_url, go, visit


@pytest.mark.browser
def test_bad_requests_show_a_message_and_the_server_keeps_serving(driver, server, sae, fs):
    assert "is not a number" in visit(driver, feature_url(server, sae, "abc"), ".error").text
    cases = {
        feature_url(
            "", sae, fs.n_features
        ): f"Feature {fs.n_features} does not exist: this SAE has {fs.n_features} latents",
        feature_url("", sae, 2): "Feature #2",  # a good page between bad ones
        f"/feature?hook={sae.hook}&sae={OTHER}&id=0": "was trained on model 'gpt2', but this run's activations come from 'minilm'",
        f"/prompt?hook={sae.hook}&sae={OTHER}&text=hi": "was trained on model 'gpt2'",
        f"/prompt?hook={sae.hook}&sae={sae.variant}&text=": "The prompt is empty",
        "/feature?hook=nope&sae=nope&id=0": "The run has no SAE nope/nope",
        "/nowhere": "There is no page '/nowhere'",
        feature_url("", sae, 3): "Feature #3",
    }
    for path, text in cases.items():
        go(driver, path, text)
        assert bool(driver.find_elements(By.CSS_SELECTOR, "#page .error")) != text.startswith("Feature #")


@pytest.mark.browser
def test_broken_run_directories_show_what_is_wrong(driver, run_dir, tmp_path):
    def broken(name: str, keep: list[str]) -> Path:
        run = tmp_path / name
        run.mkdir()
        for part in keep:
            (run / part).symlink_to(run_dir / part)
        return run

    bad_store = broken("bad-store", ["saes"])
    (bad_store / "activations.zarr").mkdir()
    (bad_store / "activations.zarr" / "zarr.json").write_text("{not json")
    cases = {
        broken("no-store", ["saes", "analysis"]): "No activation store at",
        bad_store: "cannot be read",
        broken("no-saes", ["activations.zarr"]): "No SAEs under",
    }
    for run, message in cases.items():
        srv = Server(run)
        try:
            assert message in visit(driver, srv.url + "/", ".error").text
            go(driver, "/prompt?text=hello", message)  # the next request gets the same clear answer
        finally:
            srv.close()


def test_serve_command_binds_localhost_by_default(run_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: calls.append((self, kw)))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    result = CliRunner().invoke(cli, ["serve", str(run_dir), "--port", "8123"])
    assert result.exit_code == 0, result.output
    freeze, (dash_app, kw) = calls
    assert freeze == "freeze"
    assert kw == {"host": "127.0.0.1", "port": 8123, "debug": False} and isinstance(dash_app, dash.Dash)
    result = CliRunner().invoke(cli, ["serve", str(run_dir / "nope")])
    assert result.exit_code == 2 and "no run directory" in result.output


def test_the_wsgi_entry_builds_the_flask_app_without_serving(run_dir, monkeypatch):
    monkeypatch.setattr(gc, "freeze", lambda: None)  # keep this test process's objects collectable
    monkeypatch.delenv(wsgi.RUN_ENV, raising=False)
    server = wsgi.create(str(run_dir))
    assert isinstance(server, flask.Flask)
    page = server.test_client().get("/")
    assert page.status_code == 200 and b"<title>saelab</title>" in page.data
    monkeypatch.setenv(wsgi.RUN_ENV, str(run_dir))  # gunicorn 'saelab.dashboards.wsgi:create()'
    assert isinstance(wsgi.create(), flask.Flask)
    with pytest.raises(MissingError, match="no run directory"):
        wsgi.create(str(run_dir / "nope"))
    monkeypatch.delenv(wsgi.RUN_ENV)
    with pytest.raises(ConfigError, match=f"or set {wsgi.RUN_ENV}=RUN_DIR"):
        wsgi.create()


def test_gunicorn_loads_the_documented_factory(run_dir, monkeypatch):
    util = pytest.importorskip("gunicorn.util", reason="gunicorn is not a saelab dependency; install it to serve")
    monkeypatch.setattr(gc, "freeze", lambda: None)
    server = util.import_app(f'saelab.dashboards.wsgi:create("{run_dir}")')  # parsed as `gunicorn` parses it
    assert isinstance(server, flask.Flask) and server.test_client().get("/").status_code == 200
