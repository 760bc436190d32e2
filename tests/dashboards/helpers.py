"""Helpers of the app's tests: the app served from a thread, callback requests as a browser or a script sends them
and what their answers show, Selenium waits and navigation, a small SAE trainer."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from dash import Dash
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

from saelab.dashboards.app import CALLBACK_PATH, create_app
from saelab.train import Grid, TrainConfig, TrainedSAE, train

HOOK = "blocks.1.hook_resid_post"
OTHER = "trained-on-gpt2"
CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = (
    None
    if CHROMIUM and CHROMEDRIVER
    else "browser tests need the chromium and chromedriver binaries (Debian: apt-get install chromium chromium-driver)"
)


def train_saes(store: str, out: Path, steps: int, expansion: int) -> list[TrainedSAE]:
    """Train one TopK SAE (k 16) on `store` into run `out` for `steps` steps of 512 rows."""
    cfg = TrainConfig(
        store=store,
        run=str(out),
        tokens=512 * steps,
        batch_size=512,
        eval_rows=2048,
        warmup_steps=5,
        grid=Grid(k=[16], expansion=[expansion]),
        device="cpu",
    )
    return train(cfg, progress=False)


class Server:
    """The app on 127.0.0.1 at a free port, served from a background thread."""

    def __init__(self, run: Path):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.httpd = make_server("127.0.0.1", 0, create_app(str(run)).server, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def body(app: Dash, first_input: str, values: list[Any]) -> dict[str, Any]:
    """The request a browser sends to the callback whose first input is component `first_input`: `values` are its
    inputs' then its state's values, in the order the callback declares them."""
    key, spec = next((k, s) for k, s in app.callback_map.items() if s["inputs"][0]["id"] == first_input)
    several = isinstance(spec["output"], list)
    outputs = [
        {"id": o.component_id, "property": o.component_property}
        for o in (spec["output"] if several else [spec["output"]])
    ]
    n = len(spec["inputs"])
    return {
        "output": key,
        "outputs": outputs if several else outputs[0],
        "inputs": [dict(i, value=v) for i, v in zip(spec["inputs"], values[:n])],
        "state": [dict(s, value=v) for s, v in zip(spec["state"], values[n:])],
        "changedPropIds": [f"{first_input}.{spec['inputs'][0]['property']}"],
    }


def url(path: str, **query: str) -> tuple[str, Callable[[str], list[Any]]]:
    """The routing callback's request for the page `path?query`, as (first input, values given the SAE's
    `hook|variant`) for `body`; `{sae}` in a value is the SAE's variant."""
    return "url", lambda sae: [
        path,
        "?" + urlencode({k: v.format(sae=sae.partition("|")[2]) for k, v in query.items()}),
    ]


def page(app: Dash, path: str, **query: str) -> Any:
    """The page `path?query` as the routing callback answers it (its JSON, parsed); asserts HTTP 200."""
    response = app.server.test_client().post(CALLBACK_PATH, json=body(app, "url", [path, "?" + urlencode(query)]))
    assert response.status_code == 200, response.data[:300]
    return json.loads(response.data)


def components(node: Any) -> list[dict[str, Any]]:
    """Every component in a callback answer (each a dict with `props`), depth first."""
    if isinstance(node, list):
        return [c for child in node for c in components(child)]
    if not isinstance(node, dict):
        return []
    found = [node] if isinstance(node.get("props"), dict) else []
    return found + [c for value in node.values() for c in components(value)]


def text(node: Any) -> str:
    """All the text a component (or a whole callback answer) shows."""
    if isinstance(node, str):
        return node
    if isinstance(node, dict):
        return text(node["props"].get("children")) if isinstance(node.get("props"), dict) else text(list(node.values()))
    return " ".join(text(child) for child in node) if isinstance(node, list) else ""


def by_class(answer: Any, name: str) -> list[str]:
    """The texts of the components of class `name` in a callback answer (its JSON, parsed)."""
    return [text(c) for c in components(answer) if c["props"].get("className") == name]


def errors(answer: Any) -> list[str]:
    """The texts of the error boxes in a callback answer: its JSON, as sent (bytes or text) or parsed."""
    return by_class(json.loads(answer) if isinstance(answer, (bytes, str)) else answer, "error")


def visit(driver, url: str, css: str, timeout: float = 30):
    """Load `url` and wait until the Dash app has rendered an element matching `css`."""
    driver.get(url)
    return WebDriverWait(driver, timeout).until(EC.visibility_of_element_located((By.CSS_SELECTOR, css)))


def wait_for(driver, css: str, timeout: float = 30):
    """Wait until an element matching `css` is visible; return it."""
    return WebDriverWait(driver, timeout).until(EC.visibility_of_element_located((By.CSS_SELECTOR, css)))


def wait_text(driver, css: str, text: str, timeout: float = 30) -> None:
    """Wait until the element matching `css` shows `text` (e.g. after a client-side navigation)."""
    try:
        WebDriverWait(driver, timeout).until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    except TimeoutException:
        shown = driver.find_element(By.TAG_NAME, "body").text[:400]
        raise AssertionError(f"{text!r} never appeared in {css}; the page shows {shown!r}") from None


def go(driver, path: str, text: str, css: str = "#page") -> None:
    """Navigate inside the loaded app as its links do (no page reload), and wait for `text` in `css`."""
    driver.execute_script(
        "window.history.pushState({}, '', arguments[0]);"
        "window.dispatchEvent(new CustomEvent('_dashprivate_pushstate'));",
        path,
    )
    wait_text(driver, css, text)


def screenshot(driver, path: Path) -> Path:
    """A full-page PNG (the window grows to the page's height)."""
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1400, min(max(height, 800), 4000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def feature_url(base: str, sae, index) -> str:
    return f"{base}/feature?hook={sae.hook}&sae={sae.variant}&id={index}"


def alpha(element) -> float:
    """Opacity of an element's background colour (`rgba(r, g, b, a)`)."""
    return float(re.findall(r"[\d.]+", element.value_of_css_property("background-color"))[3])
