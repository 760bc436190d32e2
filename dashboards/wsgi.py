"""Serving the app beyond one's own machine: the WSGI entry point for a production server, and the guard that
keeps `saelab serve` (Flask's development server) on the loopback interface unless told otherwise.

The app has no authentication: anyone who reaches it can read the run and run its model. Serve it to others
through a WSGI server bound to 127.0.0.1 behind a reverse proxy that authenticates (the README shows gunicorn
behind nginx):

    gunicorn --bind 127.0.0.1:8050 --threads 4 'saelab.dashboards.wsgi:create("runs/quickstart")'
    SAELAB_RUN=runs/quickstart gunicorn --bind 127.0.0.1:8050 'saelab.dashboards.wsgi:create()'
"""

from __future__ import annotations

import gc
import ipaddress
import os
from pathlib import Path

import flask

from saelab.dashboards.app import create_app
from saelab.errors import ConfigError, MissingError

RUN_ENV = "SAELAB_RUN"
"""The environment variable `create()` reads the run directory from when it is given none."""
LOOPBACK_NAMES = ("localhost",)
"""Host names taken as loopback without resolving them (besides every loopback address, 127.0.0.0/8 and ::1)."""


def create(run: str | None = None) -> flask.Flask:
    """The app for run directory `run` (default: the `SAELAB_RUN` environment variable) as a WSGI application,
    the Flask server under the Dash app, for gunicorn or any WSGI server; `MissingError` when there is no such
    folder, `ConfigError` when neither names one."""
    run = run or os.environ.get(RUN_ENV)
    if not run:
        raise ConfigError(
            f"no run directory to serve: pass it to the factory, 'saelab.dashboards.wsgi:create(\"RUN_DIR\")', "
            f"or set {RUN_ENV}=RUN_DIR"
        )
    if not Path(run).is_dir():
        raise MissingError(f"no run directory {run}; give the folder that `saelab harvest` and `train` wrote into")
    server = create_app(run).server
    gc.freeze()  # as `saelab.dashboards.app.serve` does: what is loaded by now stays out of every collection
    return server


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine alone: a loopback address (`127.0.0.1`, `::1`, `[::1]`) or
    `localhost`."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_host(host: str, port: int, *, allow_remote: bool) -> str | None:
    """Refuse to bind anything but loopback unless `allow_remote` (`ConfigError` saying why and how); the warning
    to print when it is allowed, None for loopback."""
    if is_loopback(host):
        return None
    risk = f"the app has no authentication, so anyone who can reach {host}:{port} can read this run and run its model"
    if not allow_remote:
        raise ConfigError(
            f"--host {host} is not a loopback address and {risk}. Add --allow-remote to serve it anyway, or keep "
            "the default 127.0.0.1 behind a reverse proxy that authenticates (README: 'Serving the app to others')"
        )
    return (
        f"warning: serving on {host}: {risk}, through Flask's development server. For anything shared, run a WSGI "
        "server behind a reverse proxy that authenticates (README: 'Serving the app to others')."
    )
