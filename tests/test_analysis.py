"""Feature analysis equals a brute-force computation on a small store."""

import numpy as np
import pytest
import torch

from saelab.analysis import AnalysisConfig, FeatureStore, analyze, analyze_sae, logit_effects, residual_directions
from saelab.config import HarvestConfig, TextConfig
from saelab.harvest import harvest
from saelab.sae import SAE, SAEConfig

CFG = AnalysisConfig(
    n_top=5,
    window=3,
    quantile_bins=4,
    quantile_examples=3,
    hist_bins=8,
    n_logits=4,
    n_neighbours=3,
    cooc_min_density=0.01,
    batch_size=500,
)


@pytest.fixture(scope="module")
def store(decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "acts.zarr"
    return harvest(
        HarvestConfig(
            model="tiny",
            hooks=["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"],
            out=str(out),
            context_length=16,
            batch_size=8,
            max_tokens=3000,
            shard_rows=1024,
            chunk_rows=256,
            text=TextConfig(max_documents=300),
        ),
        model=decoder,
        progress=False,
    )


def make_sae(arch, d_in=64, d_sae=48):
    torch.manual_seed(1)
    sae = SAE.from_config(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=6, hook_name="h"))
    with torch.no_grad():
        sae.b_enc.add_(0.3 * torch.randn_like(sae.b_enc) - (0.5 if arch == "relu" else 0))
    return sae


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_panels_equal_brute_force(arch, store, decoder, tmp_path):
    hook = "blocks.1.hook_resid_post"
    sae = make_sae(arch)
    fs = analyze_sae(store, sae, hook, tmp_path / "f.zarr", CFG, model=decoder, progress=False)
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


def test_logit_effects_decoder_and_encoder(decoder, minilm, store):
    sae = make_sae("topk", d_in=64)
    dirs = residual_directions(decoder, sae, "blocks.0.attn.hook_z")
    W_O = decoder.blocks[0].attn.W_O.detach()
    assert torch.allclose(dirs[3], torch.einsum("hd,hdm->m", sae.W_dec[3].detach().view(4, 16), W_O), atol=1e-5)
    kind, top_ids, top_vals, bot_ids, _ = logit_effects(decoder, dirs, 4)
    want = ((dirs - dirs.mean(1, keepdim=True)) * decoder.ln_final.w.detach()) @ decoder.W_U.detach()
    assert kind == "unembedding" and top_ids.tolist() == want.topk(4, dim=1).indices.tolist()
    assert bot_ids.tolist() == want.topk(4, dim=1, largest=False).indices.tolist()
    # encoders: nearest token embeddings; a token's own embedding is its own nearest token
    W_E = minilm.W_E.detach()
    kind, top_ids, top_vals, _, _ = logit_effects(minilm, W_E[[2000, 3000]].clone(), 3)
    assert kind == "embedding_cosine" and top_ids[:, 0].tolist() == [2000, 3000]
    np.testing.assert_allclose(top_vals[:, 0], 1, rtol=1e-5)


def test_analyze_run_dir_and_token_search(decoder_dir, tmp_path):
    from saelab.train import TrainConfig, train

    run = tmp_path / "run"
    harvest(
        HarvestConfig(
            model=decoder_dir,
            hooks=["blocks.0.hook_mlp_out"],
            out=str(run / "activations.zarr"),
            context_length=16,
            batch_size=8,
            max_tokens=6000,
            shard_rows=1024,
            chunk_rows=256,
        ),
        progress=False,
    )
    train(
        TrainConfig(
            store=str(run / "activations.zarr"),
            run=str(run),
            tokens=256 * 10,
            batch_size=256,
            eval_rows=1024,
            grid={"k": [4], "expansion": [2]},
        ),
        progress=False,
    )
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
