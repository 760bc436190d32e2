"""The CLI: a clear error (no traceback) for bad input, harvest and hooks, help for every command."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from saelab.cli import app

runner = CliRunner()


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_cli_reports_errors_without_traceback(tmp_path, decoder_dir):
    result = runner.invoke(app, ["harvest", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output and "Traceback" not in result.output
    bad = write(
        tmp_path, {"model": decoder_dir, "hooks": ["blocks.0.hook_resid_psot"], "out": str(tmp_path / "o.zarr")}
    )
    result = runner.invoke(app, ["harvest", str(bad)])
    assert result.exit_code == 2 and "Closest: blocks.0.hook_resid_post" in result.output
    result = runner.invoke(app, ["info", str(tmp_path / "none.zarr")])
    assert result.exit_code == 2 and "no activation store" in result.output


def test_cli_harvest_and_hooks(tmp_path, decoder_dir):
    cfg = write(
        tmp_path,
        {
            "model": decoder_dir,
            "hooks": ["blocks.0.hook_resid_post"],
            "out": str(tmp_path / "o.zarr"),
            "context_length": 16,
            "batch_size": 2,
            "max_tokens": 64,
            "shard_rows": 32,
            "chunk_rows": 16,
        },
    )
    result = runner.invoke(app, ["harvest", str(cfg), "--quiet", "--set", "max_tokens=48"])
    assert result.exit_code == 0, result.output
    assert "rows         48 complete" in result.output
    result = runner.invoke(app, ["hooks", decoder_dir])
    assert "blocks.1.attn.hook_z" in result.output


def test_every_command_has_help():
    for cmd in ["harvest", "info", "hooks", "import"]:
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def _served(monkeypatch) -> list[dict]:
    """Record `saelab serve`'s call of the app's `serve` instead of starting a server."""
    calls: list[dict] = []
    monkeypatch.setattr("saelab.dashboards.app.serve", lambda run, **kw: calls.append({"run": run, **kw}))
    return calls


def test_serve_refuses_a_non_loopback_host_without_allow_remote(tmp_path, monkeypatch):
    calls = _served(monkeypatch)
    for host in ["0.0.0.0", "::", "192.168.1.5", "example.org", ""]:
        result = runner.invoke(app, ["serve", str(tmp_path), "--host", host])
        assert result.exit_code == 2 and "Traceback" not in result.output, (host, result.output)
        assert f"--host {host} is not a loopback address" in result.output and "no authentication" in result.output
        assert "Add --allow-remote" in result.output and "reverse proxy" in result.output
    # refused before anything else is looked at, even a run directory that is not there
    result = runner.invoke(app, ["serve", str(tmp_path / "nope"), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "not a loopback address" in result.output
    assert calls == []


def test_quickstart_refuses_a_non_loopback_host_before_any_work(tmp_path, monkeypatch):
    import saelab.quickstart

    monkeypatch.setattr(saelab.quickstart, "quickstart", lambda *a, **kw: pytest.fail("the quickstart ran"))
    result = runner.invoke(app, ["quickstart", "--out", str(tmp_path / "q"), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "not a loopback address" in result.output and "Add --allow-remote" in result.output
    assert not (tmp_path / "q").exists()


def test_serve_binds_loopback_freely_and_other_hosts_with_a_warning(tmp_path, monkeypatch):
    calls = _served(monkeypatch)
    for host in ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"]:
        result = runner.invoke(app, ["serve", str(tmp_path), "--host", host, "--port", "8123"])
        assert result.exit_code == 0 and "warning" not in result.output, (host, result.output)
    result = runner.invoke(app, ["serve", str(tmp_path), "--host", "0.0.0.0", "--allow-remote"])
    assert result.exit_code == 0, result.output
    assert "warning: serving on 0.0.0.0: the app has no authentication" in result.output
    assert [c["host"] for c in calls] == ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST", "0.0.0.0"]
    assert calls[-1] == {"run": str(tmp_path), "host": "0.0.0.0", "port": 8050}
