"""A broken SAE folder stays local: in a run with a good SAE and a broken one (broken in each way a folder can be:
garbage or wrongly shaped JSON, missing or cut-short weights, a missing or damaged feature analysis), the overview
lists both, the broken one with its error in its row; the good one's feature page, search and prompt work, also
as the pages' defaults; the broken one's pages show an error box naming it. Every answer is HTTP 200 (never a 500).
Requests go through the app's routing callback with Flask's test client, as the browser sends them."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from saelab.analysis.features import ROWS
from saelab.circuits import Circuit, Node
from saelab.dashboards.app import create_app
from saelab.dashboards.data import NO_ANALYSIS, SaeInfo
from saelab.dashboards.pages.circuits import node_link
from saelab.errors import RunError
from saelab.run import SAE_CONFIG, SAE_METRICS, SAE_WEIGHTS, RunDir
from tests.dashboards.helpers import by_class, components, errors, page, text

BROKEN = "a-broken"  # sorts before the good SAE's variant, so a page's default must skip it by itself


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _first_chunk(analysis: Path) -> Path:
    """The file of the first chunk (latents 0 to 63) of the analysis's packed panels (what a feature page reads)."""
    return next(p for p in sorted((analysis / ROWS).rglob("*")) if p.is_file() and p.name != "zarr.json")


# How the broken SAE is damaged (its folder, its analysis), and a part of what its own pages then say.
BREAKS: dict[str, tuple[Callable[[Path, Path], Any], str]] = {
    "cfg-garbage": (lambda sae, an: (sae / SAE_CONFIG).write_text("{not json"), f"{SAE_CONFIG} cannot be read"),
    "cfg-a-list": (lambda sae, an: (sae / SAE_CONFIG).write_text("[1, 2]"), "holds a JSON list, not an object"),
    "metrics-garbage": (lambda sae, an: (sae / SAE_METRICS).write_bytes(b"\xff\xfe"), f"{SAE_METRICS} cannot be read"),
    "weights-missing": (lambda sae, an: (sae / SAE_WEIGHTS).unlink(), "it has no weights"),
    "weights-cut-short": (lambda sae, an: _cut_short(sae / SAE_WEIGHTS), "the file is damaged or cut short"),
    "analysis-missing": (lambda sae, an: shutil.rmtree(an), "has no feature analysis yet"),
    "analysis-metadata-garbage": (lambda sae, an: (an / "zarr.json").write_text("{not json"), "cannot be read"),
    "analysis-chunk-garbage": (
        lambda sae, an: _first_chunk(an).write_bytes(b"\x00not zstd" * 8),
        f"the packed panels {ROWS!r}, latents 0 to 63, cannot be read (RuntimeError: Zstd decompression error",
    ),
    "analysis-chunk-missing": (lambda sae, an: _first_chunk(an).unlink(), "its chunk c/0/0 is missing"),
}
SAE_BROKEN = {"cfg-garbage", "cfg-a-list", "metrics-garbage", "weights-missing", "weights-cut-short"}
CHUNK_BROKEN = {"analysis-chunk-garbage", "analysis-chunk-missing"}  # shows only when that chunk is read


def two_sae_run(root: Path, run_dir: Path, good: SaeInfo, damage: Callable[[Path, Path], Any]) -> Path:
    """A run at `root` with `run_dir`'s store, its SAE `good` (linked, with its analysis) and a copy of it, variant
    `BROKEN`, with its analysis, then damaged by `damage(folder, analysis)`."""
    src, run = RunDir(run_dir), RunDir(root)
    for path in (run.sae(good.hook, BROKEN), run.analysis(good.hook, BROKEN)):
        path.parent.mkdir(parents=True, exist_ok=True)
    for linked in (src.store, src.vocab, good.path, src.analysis(good.hook, good.variant)):
        (root / linked.relative_to(run_dir)).symlink_to(linked)
    shutil.copytree(good.path, run.sae(good.hook, BROKEN))
    shutil.copytree(src.analysis(good.hook, good.variant), run.analysis(good.hook, BROKEN))
    damage(run.sae(good.hook, BROKEN), run.analysis(good.hook, BROKEN))
    return root


def sae_rows(answer: dict[str, Any]) -> dict[str, str]:
    """The overview's SAE table: each row's text by its variant."""
    table = next(c for c in components(answer) if c["props"].get("id") == "sae-table")
    rows = [c for c in components(table) if c.get("type") == "Tr"][1:]  # the first is the header
    return {text(r["props"]["children"][1]): text(r) for r in rows}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_a_broken_sae_leaves_the_other_saes_pages_working(kind, run_dir, sae, busy, tmp_path):
    damage, message = BREAKS[kind]
    run = two_sae_run(tmp_path / "run", run_dir, sae, damage)
    app = create_app(str(run))
    folder = RunDir(run).sae(sae.hook, BROKEN)

    overview = page(app, "/")
    rows = sae_rows(overview)
    assert errors(overview) == [] and set(rows) == {BROKEN, sae.variant}
    assert "features" in rows[sae.variant] and f"{sae.metrics['fvu']:.4g}" in rows[sae.variant]
    if kind == "analysis-missing":
        assert NO_ANALYSIS in rows[BROKEN] and by_class(overview, "row-error") == []
    elif kind not in CHUNK_BROKEN:  # damaged chunks show only when read: on the latent's page
        (shown,) = by_class(overview, "row-error")
        assert message in shown and shown in rows[BROKEN] and "features" not in rows[BROKEN]

    good = {"hook": sae.hook, "sae": sae.variant}
    # pages that name no SAE skip the broken one; a damaged chunk shows only when read, so that SAE may be chosen
    default = BROKEN if kind in CHUNK_BROKEN else sae.variant
    for path, query, shows in [
        ("/feature", {**good, "id": str(busy)}, f"Feature #{busy}"),
        ("/search", {**good, "q": "the"}, "Latents by token"),
        ("/search", {"q": "the"}, "Latents by token"),
        ("/prompt", {**good, "text": "the cat sat"}, "Top latents per token"),
        ("/prompt", {"text": "the cat sat"}, f"({sae.hook} · {default})"),
    ]:
        answer = page(app, path, **query)
        assert errors(answer) == [] and shows in text(answer), (path, query)

    (box,) = errors(page(app, "/feature", hook=sae.hook, sae=BROKEN, id="0"))
    assert message in box
    if kind in SAE_BROKEN:
        assert f"The SAE {sae.hook}/{BROKEN} cannot be used" in box and str(folder) in box and "train it again" in box
        for path, query in [("/prompt", {"text": "hi"}), ("/search", {"q": "the"}), ("/steering", {"text": "hi"})]:
            (box,) = errors(page(app, path, hook=sae.hook, sae=BROKEN, **query))
            assert box.startswith(f"The SAE {sae.hook}/{BROKEN} cannot be used"), (path, box)
        options = next(c for c in components(page(app, "/prompt")) if c["props"].get("id") == "prompt-sae")
        disabled = [o["value"] for o in options["props"]["options"] if o.get("disabled")]
        assert disabled == [f"{sae.hook}|{BROKEN}"]
    else:  # the analysis named, with the fix (a damaged chunk: with zarr's reason, from FeatureStore's read)
        assert str(RunDir(run).analysis(sae.hook, BROKEN)) in box and f"saelab analyze {run}" in box


def test_a_run_whose_only_sae_is_broken_says_so_on_every_page(run_dir, sae, tmp_path):
    run = two_sae_run(tmp_path / "run", run_dir, sae, BREAKS["weights-missing"][0])
    RunDir(run).sae(sae.hook, sae.variant).unlink()  # the link to the good SAE
    app = create_app(str(run))
    overview = page(app, "/")
    assert set(sae_rows(overview)) == {BROKEN} and len(by_class(overview, "row-error")) == 1
    for path in ("/prompt", "/search"):
        (box,) = errors(page(app, path))
        assert box.startswith(f"None of the run's 1 SAEs can be used. The SAE {sae.hook}/{BROKEN} cannot be used")


def test_a_circuit_node_of_a_broken_sae_names_what_is_wrong_with_it(run_dir, sae, tmp_path):
    """A circuit's latent links to its SAE's feature page; a broken SAE in the run says what is wrong with it (not
    that it is missing from the run), and one outside the run says that."""
    run = two_sae_run(tmp_path / "run", run_dir, sae, BREAKS["weights-missing"][0])
    saes = {sae.hook: str(RunDir(run_dir).sae(sae.hook, sae.variant))}
    circuit = Circuit(
        name="c",
        hooks=[sae.hook],
        saes=saes,
        labels=["a"],
        nodes=[Node(sae.hook, 3, 0, 0.5)],
        edges=[],
        curves={"n": [1], "faithfulness": [1.0], "completeness": [0.0]},
        metric={"clean": 1.0, "empty": 0.0},
    )
    assert node_link(str(run), circuit, sae.hook, 3) == f"/feature?hook={sae.hook}&sae={sae.variant}&id=3"
    broken = dataclasses.replace(circuit, saes={sae.hook: str(RunDir(run).sae(sae.hook, BROKEN))})
    with pytest.raises(RunError, match=f"The SAE {sae.hook}/{BROKEN} cannot be used: it has no weights"):
        node_link(str(run), broken, sae.hook, 3)
    elsewhere = dataclasses.replace(circuit, saes={sae.hook: "/elsewhere/other-variant"})
    with pytest.raises(RunError, match="not in this run's saes/ folder"):
        node_link(str(run), elsewhere, sae.hook, 3)
