"""The feature pass's DFA panels (`saelab.analysis.dfa`) on the induction run: each top example's per-head and
per-source-token attribution is `direct_feature_attribution` of the latent on that example's context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.analysis import FeatureStore
from saelab.analysis.dfa import dfa_panels
from saelab.config import HarvestConfig
from saelab.dictionaries import SAE
from saelab.harvest import harvest
from saelab.heads import direct_feature_attribution
from saelab.run import RunDir
from saelab.store import ActivationStore

HOOK = "blocks.1.attn.hook_z"


@pytest.mark.parametrize("layer", [0, 1])
def test_dfa_panels_equal_direct_feature_attribution_on_each_top_example(model, induction_run, layer):
    run = RunDir(induction_run)
    (entry,) = [s for s in run.saes() if s.hook == f"blocks.{layer}.attn.hook_z"]
    sae = SAE.load(entry.path).eval()
    fs = FeatureStore.open(run.analysis(entry.hook, entry.variant))
    store = ActivationStore.open(str(run.store))
    ctx = store.contexts(slice(0, store.n_tokens))
    live = np.flatnonzero(fs.column("count") >= 20)[:6]  # latents with twenty top examples
    assert len(live) == 6
    window = fs.feature(int(live[0]))["top_tokens"].shape[1] // 2
    checked = 0
    for latent in live.tolist():
        f = fs.feature(latent)
        for slot in range(0, len(f["top_rows"]), 7):  # three of the twenty examples
            row = int(f["top_rows"][slot])
            rows = np.flatnonzero(ctx == ctx[row])  # this store keeps every position (no framing dropped)
            tokens = torch.from_numpy(store.tokens(rows).astype(np.int64))[None]
            dest = int(store.positions([row])[0])
            found = direct_feature_attribution(model, sae, tokens, latents=[latent])
            assert float(found.acts[0, dest, 0]) == pytest.approx(float(f["top_acts"][slot]), rel=1e-4)
            torch.testing.assert_close(torch.from_numpy(f["dfa_heads"][slot]), found.per_head[0, dest, :, 0])
            sources = found.by_source()[0, dest, :, 0]
            shown = np.arange(dest - window, dest + window + 1)
            inside = (shown >= 0) & (shown < tokens.shape[1])
            want = torch.where(torch.from_numpy(inside), sources[np.clip(shown, 0, tokens.shape[1] - 1)], 0)
            torch.testing.assert_close(torch.from_numpy(f["dfa_sources"][slot]), want)
            checked += 1
    assert checked == 18


def test_dfa_panels_put_back_the_framing_a_harvest_dropped(model, induction_sae, induction_run, tmp_path):
    """A store of the same text without its special tokens (`drop_special_tokens`, the default: BOS and the document
    separator are not stored) gets the same DFA panels: the contexts are rebuilt with their framing."""
    run = RunDir(induction_run)
    full = ActivationStore.open(str(run.store))
    cfg = HarvestConfig(**(full.config | {"out": str(tmp_path / "dropped.zarr"), "drop_special_tokens": True}))
    cfg.model, cfg.text.path = str(induction_run / "model"), str(induction_run / "induction.txt")
    cfg.max_tokens = 128 * 20  # 128 contexts of 22 tokens, 20 of them stored
    dropped = harvest(cfg, progress=False)
    assert dropped.n_tokens == 128 * 20 and set(dropped.positions(slice(0, 40)).tolist()) == set(range(1, 21))
    top_rows = np.full((induction_sae.cfg.d_sae, 3), -1)
    top_rows[:4] = [[5, 30, 2000], [19, 21, 1], [0, 400, 777], [2559, 1234, 20]]  # store rows of the dropped store
    panels = dfa_panels(dropped, induction_sae, model, hook=HOOK, top_rows=top_rows, window=3)
    for latent, slot in np.argwhere(top_rows >= 0).tolist():
        row = int(top_rows[latent, slot])
        context, dest = int(dropped.contexts([row])[0]), int(dropped.positions([row])[0])
        tokens = torch.from_numpy(full.tokens(slice(22 * context, 22 * context + 22)).astype(np.int64))[None]
        assert int(full.contexts([22 * context])[0]) == context
        found = direct_feature_attribution(model, induction_sae, tokens, latents=[latent])
        torch.testing.assert_close(torch.from_numpy(panels.heads[latent, slot]), found.per_head[0, dest, :, 0])
        want = [float(found.by_source()[0, dest, p, 0]) if 1 <= p <= 20 else 0.0 for p in range(dest - 3, dest + 4)]
        assert panels.sources[latent, slot].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
