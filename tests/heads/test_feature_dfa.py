"""The feature pass's DFA panels (`saelab.analysis.dfa`) on the induction run: each top example's per-head and
per-source-token attribution is `direct_feature_attribution` of the latent on that example's context."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.analysis import FeatureStore
from saelab.dictionaries import SAE
from saelab.heads import direct_feature_attribution
from saelab.run import RunDir
from saelab.store import ActivationStore


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
