"""Feature analysis equals a brute-force computation on a small store; a run's SAEs are found and analysed."""

import numpy as np
import pytest
import torch

from saelab.analysis import FeatureStore, analyze, analyze_sae
from tests.analysis.helpers import CFG, make_sae


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_panels_equal_brute_force(arch, store, decoder, tmp_path):
    hook = "blocks.1.hook_resid_post"
    sae = make_sae(arch)
    fs = analyze_sae(store, sae, hook, out=tmp_path / "f.zarr", cfg=CFG, model=decoder, progress=False)
    x = store.activations(hook)
    with torch.no_grad():
        f = sae.encode(x).numpy()
    tokens, ctx = store.tokens(), store.contexts()
    n, d_sae = f.shape
    active = f > 0
    assert fs.n_features == d_sae
    w = CFG.window
    cooc_candidates = np.flatnonzero(active.sum(0) >= CFG.cooc_min_density * n)
    for i in range(d_sae):
        p = fs.feature(i)
        vals = f[active[:, i], i]
        assert p["count"] == len(vals) and p["density"] == pytest.approx(len(vals) / n)
        if not len(vals):
            continue
        assert p["max_act"] == pytest.approx(vals.max()) and p["mean_act"] == pytest.approx(vals.mean(), rel=1e-5)
        # top examples, largest first, with their contexts and this latent's activation at each context token
        order = np.argsort(-f[:, i], kind="stable")[: min(CFG.n_top, len(vals))]
        assert p["top_rows"][: len(order)].tolist() == order.tolist()
        np.testing.assert_allclose(p["top_acts"][: len(order)], f[order, i], rtol=1e-6)
        for j, row in enumerate(order):
            for o in range(-w, w + 1):
                r = row + o
                inside = 0 <= r < n and ctx[r] == ctx[row]
                assert p["top_tokens"][j, o + w] == (tokens[r] if inside else -1)
                assert p["top_token_acts"][j, o + w] == pytest.approx(f[r, i] if inside else 0, abs=1e-6)
        # true quantile bins, and examples drawn from inside each bin without repeats
        s = np.sort(vals)
        c = len(s)
        want_edges = [s[min(b * c // CFG.quantile_bins, c - 1)] for b in range(CFG.quantile_bins)] + [s[-1]]
        np.testing.assert_allclose(p["quantile_edges"], want_edges, rtol=1e-6)
        picked = p["quantile_rows"][p["quantile_rows"] >= 0]
        assert len(set(picked.tolist())) == len(picked)
        for b in range(CFG.quantile_bins):
            in_bin = [k for k in range(c) if k * CFG.quantile_bins // c == b]  # ranks in bin b
            acts = p["quantile_acts"][b][p["quantile_rows"][b] >= 0]
            assert len(acts) == min(CFG.quantile_examples, len(in_bin))
            if in_bin:  # values can tie across ranks, so check the bin's value range
                assert all(s[in_bin[0]] <= a <= s[in_bin[-1]] for a in acts)
            np.testing.assert_allclose(acts, f[p["quantile_rows"][b][p["quantile_rows"][b] >= 0], i], rtol=1e-6)
        # histogram of the nonzero activations over [0, max]
        counts, _ = np.histogram(vals, bins=CFG.hist_bins, range=(0, vals.max()))
        assert p["hist_counts"].tolist() == counts.tolist()
        # co-occurrence (Jaccard) among frequent latents
        if i in cooc_candidates:
            a = active[:, i]
            jac = {j: (a & active[:, j]).sum() / (a | active[:, j]).sum() for j in cooc_candidates if j != i}
            best = sorted(jac.values(), reverse=True)[: CFG.n_neighbours]
            np.testing.assert_allclose(p["cooc_jaccard"][: len(best)], best, rtol=1e-5)
        else:
            assert (p["cooc_ids"] == -1).all()
    # decoder neighbours by cosine
    wd = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    cos = (wd @ wd.T).fill_diagonal_(-2)
    for i in (0, 7, d_sae - 1):
        assert fs.feature(i)["neighbour_ids"].tolist() == cos[i].topk(CFG.n_neighbours).indices.tolist()


def test_analyze_run_dir_and_token_search(run):
    (path,) = analyze(run, CFG, progress=False)
    fs = FeatureStore.open(path)
    assert fs.attrs["hook"] == "blocks.0.hook_mlp_out" and fs.attrs["logit_kind"] == "unembedding"
    assert len(fs.vocab) == 512
    busiest = max(range(fs.n_features), key=lambda i: fs.feature(i)["count"])
    p = fs.feature(busiest)
    token = int(p["top_tokens"][0, CFG.window])
    assert busiest in fs.search_token(token)
    with pytest.raises(IndexError, match="does not exist"):
        fs.feature(fs.n_features)


def test_an_icfl_dictionary_is_refused_with_the_way_out(run):
    from saelab.dictionaries import SAE, SAEConfig
    from saelab.errors import RunError

    (cfg_file,) = sorted(run.glob("saes/*/*/cfg.json"))
    folder, d_in = cfg_file.parent, SAE.load(cfg_file.parent).cfg.d_in
    SAE.from_config(SAEConfig(arch="icfl", d_in=d_in, d_sae=2 * d_in, k=4, icfl_block=2)).save(folder)
    with pytest.raises(RunError, match="is a icfl dictionary, whose codes are signed"):
        analyze(run, CFG, progress=False)
