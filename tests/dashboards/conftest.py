"""Fixtures of the app's tests: a real run that saelab harvests, trains and analyses here (MiniLM over the
embedded corpus, a small TopK SAE, `saelab.analysis.analyze`), the app serving it, and headless Chromium.

Tests marked `browser` are skipped where the chromium and chromedriver binaries are missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from saelab.analysis import AnalysisConfig, FeatureStore, analyze
from saelab.dashboards.data import feature_store, list_saes
from saelab.run import SAE_CONFIG
from saelab.toys.runs import small_run, small_store
from saelab.train.sweep import write_sweep_outputs
from tests.dashboards.helpers import CHROMEDRIVER, CHROMIUM, HOOK, NO_BROWSER, OTHER, Server, train_saes


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if NO_BROWSER and item.get_closest_marker("browser"):
        pytest.skip(NO_BROWSER)


@pytest.fixture(scope="session")
def run_dir(minilm, tmp_path_factory) -> Path:
    """A real run: harvest 8k MiniLM tokens, train a 1536-latent TopK SAE, sweep outputs, analysis; plus a
    copy of the SAE whose config says it was trained on another model (the app must refuse it)."""
    run = tmp_path_factory.mktemp("app") / "run"
    store = small_store(run, "minilm", HOOK, tokens=8192, context_length=64, loaded=minilm)
    rows = train_saes(store.path, run, steps=30, expansion=4)
    write_sweep_outputs([r.row() for r in rows], run)
    analyze(str(run), AnalysisConfig(device="cpu"), progress=False)
    src = rows[0].path
    other = src.parent / OTHER
    shutil.copytree(src, other)
    cfg = json.loads((other / SAE_CONFIG).read_text())
    cfg["metadata"]["model_name"] = cfg["metadata"]["saelab_config"]["model_name"] = "gpt2"
    (other / SAE_CONFIG).write_text(json.dumps(cfg))
    return run


@pytest.fixture(scope="session")
def sae(run_dir):
    """The analysed SAE of the run."""
    return next(s for s in list_saes(str(run_dir)) if s.variant != OTHER)


@pytest.fixture(scope="session")
def fs(run_dir, sae) -> FeatureStore:
    return feature_store(str(run_dir), sae)


@pytest.fixture(scope="session")
def busy(fs) -> int:
    """A latent that fires often enough to have full panels."""
    counts = [fs.feature(i)["count"] for i in range(16)]
    return int(np.argmax(counts))


@pytest.fixture(scope="session")
def decoder_run(decoder_dir, tmp_path_factory) -> Path:
    """A small run of the tiny decoder: a TopK SAE on blocks.0.hook_resid_post (k 8, 128 latents), analysed."""
    return small_run(tmp_path_factory.mktemp("steer-dec"), decoder_dir, "blocks.0.hook_resid_post", k=8, analysed=True)


@pytest.fixture(scope="module")
def server(run_dir):
    """The app over `run_dir`, on 127.0.0.1 (its URL)."""
    srv = Server(run_dir)
    yield srv.url
    srv.close()


@pytest.fixture(scope="session")
def driver():
    """Headless Chromium."""
    assert CHROMIUM and CHROMEDRIVER, NO_BROWSER  # browser tests are skipped before they get here without them
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--window-size=1400,1000",
    ]:
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield d
    d.quit()
