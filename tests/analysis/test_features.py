"""`FeatureStore`: one latent's panels read by chunk (packed rows, or panel by panel for analyses written before them)
and cached (also across threads), damaged and missing chunks named with the fix, on a tiny analysis written by
`write_feature_store` whose values are known."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from saelab.analysis import features
from saelab.analysis.features import FEATURE_CHUNK, ROW_LAYOUT, ROWS, FeatureStore, write_feature_store
from saelab.errors import FeatureIndexError, StoreError
from saelab.run import RunDir

D_SAE = 2 * FEATURE_CHUNK + 2  # three chunks, the last one short


def panels() -> dict[str, np.ndarray]:
    """Panels whose values say which latent they belong to; chunk 1 of `count` is all zeros (dead latents)."""
    latent = np.arange(D_SAE)
    count = np.where(latent // FEATURE_CHUNK == 1, 0, latent + 1)
    top_tokens = (latent[:, None, None] * 10 + np.arange(3)[None, :, None] + np.zeros(5, int)).astype(np.int32)
    return {
        "max_act": latent.astype(np.float32) / 2,
        "count": count.astype(np.int64),
        "top_tokens": top_tokens,  # [d_sae, 3 examples, 5 positions]: every example's own token (the middle) is 10i+j
        "top_acts": np.tile(latent[:, None], (1, 3)).astype(np.float32),
    }


@pytest.fixture
def analysis(tmp_path) -> Path:
    path = RunDir(tmp_path / "run").analysis("blocks.0.hook_resid_post", "topk-k4")
    path.parent.mkdir(parents=True)
    write_feature_store(path, panels(), {"d_sae": D_SAE})
    return path


def written_before_rows(analysis: Path) -> Path:
    """The analysis as `write_feature_store` wrote it before `ROWS`: one array per panel, nothing packed."""
    shutil.rmtree(analysis / ROWS)
    del zarr.open_group(str(analysis), mode="r+").attrs[ROW_LAYOUT]
    return analysis


@pytest.mark.parametrize("layout", ["packed", "written-before-rows"])
def test_a_feature_has_its_own_row_of_every_panel(analysis, layout):
    fs = FeatureStore.open(analysis if layout == "packed" else written_before_rows(analysis))
    want = panels()
    for i in (0, FEATURE_CHUNK - 1, FEATURE_CHUNK, D_SAE - 1):
        f = fs.feature(i)
        assert set(f) == set(want)
        assert f["max_act"] == i / 2 and isinstance(f["max_act"], float)  # halves are exact in float32
        assert f["count"] == want["count"][i] and isinstance(f["count"], int)
        assert np.array_equal(f["top_tokens"], want["top_tokens"][i])
    assert np.array_equal(fs.column("count"), want["count"])
    assert fs.search_token(10 * 5 + 2) == [5]
    with pytest.raises(FeatureIndexError, match=f"this SAE has features 0..{D_SAE - 1}"):
        fs.feature(D_SAE)


def test_every_chunk_is_written_even_all_zeros(analysis):
    assert (analysis / "count" / "c" / "1").is_file()  # zarr leaves out chunks of fill values unless told


def test_a_chunk_of_latents_is_one_read_of_the_packed_rows(analysis, monkeypatch):
    fs = FeatureStore.open(analysis)
    read = []
    monkeypatch.setattr(
        fs, "_panel", lambda array, rows: read.append(array.path) or FeatureStore._panel(fs, array, rows)
    )
    f = fs.feature(FEATURE_CHUNK + 3)
    assert read == [ROWS]
    assert f["top_acts"].dtype == np.float32 and f["top_tokens"].shape == (3, 5) and f["count"] == 0
    assert np.array_equal(f["top_tokens"], panels()["top_tokens"][FEATURE_CHUNK + 3])


def test_a_read_chunk_is_served_from_the_cache_until_evicted(analysis, monkeypatch):
    fs = FeatureStore.open(analysis)
    assert fs.feature(3)["max_act"] == 1.5
    (analysis / ROWS / "c" / "0" / "0").unlink()
    assert fs.feature(5)["max_act"] == 2.5  # chunk 0 is cached: no read
    monkeypatch.setattr(features, "CACHED_CHUNKS", 1)
    fs.feature(FEATURE_CHUNK)  # evicts chunk 0
    with pytest.raises(StoreError, match="its chunk c/0/0 is missing"):
        fs.feature(5)


def test_threads_reading_at_once_get_their_own_features(analysis):
    fs = FeatureStore.open(analysis)
    ids = np.random.default_rng(0).integers(0, D_SAE, 400).tolist()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: fs.feature(i)["max_act"], ids))
    assert got == [i / 2 for i in ids]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda chunk: chunk.write_bytes(b"\x00not zstd" * 8), "RuntimeError: Zstd decompression error"),
        (lambda chunk: chunk.unlink(), "FileNotFoundError: its chunk c/1/0 is missing"),
    ],
    ids=["damaged", "missing"],
)
def test_a_damaged_or_missing_chunk_is_a_store_error_naming_the_analysis_and_the_fix(analysis, damage, reason):
    damage(analysis / ROWS / "c" / "1" / "0")
    damage(analysis / "top_tokens" / "c" / "1" / "0" / "0")
    fs = FeatureStore.open(analysis)
    assert fs.feature(0)["max_act"] == 0.0  # the other chunks read as before
    where = (
        f"The feature analysis {analysis} is damaged: the packed panels {ROWS!r}, latents 64 to 127, cannot be read ("
    )
    fix = f"). Run `saelab analyze {analysis.parents[2]}` again to recompute it."
    with pytest.raises(StoreError, match=re.escape(where) + reason + ".*" + re.escape(fix)):
        fs.feature(FEATURE_CHUNK + 1)
    with pytest.raises(StoreError, match="panel 'top_tokens', latents 0 to 129"):
        fs.column("top_tokens")
