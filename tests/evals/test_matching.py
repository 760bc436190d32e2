"""Cross-dictionary matching on known answers: two seeds trained in one pass on synthetic data with a known dictionary
are matched 1:1 on the true directions; planted splits are found 1:n; the sparse solve agrees with the dense one."""

from __future__ import annotations

import pytest
import torch

from saelab.dictionaries import SAE
from saelab.errors import ConfigError, SAELoadError
from saelab.evals import best_matches, load_decoder, one_to_one, splits
from saelab.importer import import_arrays
from saelab.toys.synthetic import make_synthetic
from saelab.train import Grid, TrainConfig, train

N_TRUE, D = 32, 32


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """The true directions `[32, 32]` and two TopK SAEs of 64 latents (seeds 0 and 1, one pass, 120 steps) trained on
    their sparse combinations (uniform frequencies, 3 active per token on average: data easy enough to recover)."""
    root = tmp_path_factory.mktemp("seeds")
    data = make_synthetic(n_features=N_TRUE, d=D, mean_active=3.0, n_pairs=0, freq_exponent=0.0, seed=0)
    x = data.sample(12_288, torch.Generator().manual_seed(0)).numpy()
    import_arrays({"h": x}, str(root / "s.zarr"), dtype="float32", shard_rows=4096, chunk_rows=1024, progress=False)
    cfg = TrainConfig(
        store=str(root / "s.zarr"),
        run=str(root / "run"),
        tokens=256 * 120,
        batch_size=256,
        eval_rows=1024,
        warmup_steps=10,
        ce_contexts=0,
        grid=Grid(k=[3], expansion=[2], seed=[0, 1], lr=[1e-2]),
    )
    results = train(cfg, progress=False)
    return data.directions, [SAE.load(r.path) for r in results], [r.path for r in results]


def _truth(true_dirs: torch.Tensor, sae: SAE) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's nearest true direction, and whether it is that direction (cosine >= 0.9)."""
    cos = true_dirs @ sae.W_dec.detach().T
    return cos.argmax(0), cos.amax(0) >= 0.9


def test_two_seeds_are_matched_on_the_true_directions(seeds):
    true_dirs, (a, b), _ = seeds
    truth_a, found_a = _truth(true_dirs, a)
    truth_b, found_b = _truth(true_dirs, b)
    recovered = [set(t[f].tolist()) for t, f in ((truth_a, found_a), (truth_b, found_b))]
    assert len(recovered[0]) == len(recovered[1]) == N_TRUE  # both seeds recovered every true direction
    m = one_to_one(a, b)
    assert m.exact and sorted(m.partner.tolist()) == list(range(64))  # same widths: a permutation
    pairs = found_a & found_b[m.partner]  # pairs of latents that are both some true direction
    same = truth_a[pairs] == truth_b[m.partner][pairs]
    # Measured: all 32 true directions appear as a matched pair, every such pair on the same direction (rate 1.0);
    # a seed that recovers a direction twice leaves its duplicate paired with a stray latent, hence >= 0.9.
    assert same.all() and len(set(truth_a[pairs][same].tolist())) >= 0.9 * N_TRUE
    assert (m.cosine[pairs] >= 0.9).all()
    assert m.share(0.9) == pytest.approx(pairs.float().mean().item())  # the other latents are stray, below 0.9
    best = best_matches(a, b)
    assert torch.equal(best.index[pairs], m.partner[pairs])  # on the true directions nearest is the 1:1 partner


def test_the_sparse_solve_finds_the_dense_matching(seeds):
    _, (a, b), _ = seeds
    dense, sparse = one_to_one(a, b), one_to_one(a, b, dense_limit=0)
    assert not sparse.exact and torch.equal(sparse.partner, dense.partner)
    narrow = one_to_one(a.W_dec[:40], b)  # rectangular, either way round: each latent of the narrower one paired
    assert (narrow.partner >= 0).all() and len(set(narrow.partner.tolist())) == 40
    wide = one_to_one(b, a.W_dec[:40], dense_limit=0)
    assert (wide.partner >= 0).sum() == 40 and torch.equal(wide.partner[narrow.partner], torch.arange(40))


def test_planted_splits_are_found_one_to_many():
    """The wide dictionary is 96 orthonormal directions in 128 dims; the narrow one merges wide latents 0..29 in pairs
    and 30..59 in triples (each narrow latent the sum of its children: cosine 1/sqrt(2) or 1/sqrt(3) with each), and
    has 60..89 as they are."""
    wide = torch.linalg.qr(torch.randn(128, 96, generator=torch.Generator().manual_seed(0))).Q.T
    planted = [list(range(i, i + 2)) for i in range(0, 30, 2)] + [list(range(i, i + 3)) for i in range(30, 60, 3)]
    narrow = torch.stack([wide[c].sum(0) for c in planted] + list(wide[60:90]))
    s = splits(narrow, wide)
    assert s.groups() == dict(enumerate(planted))
    assert [s.children(25 + i) for i in range(30)] == [[60 + i] for i in range(30)]  # kept as they were
    assert (s.parent[90:] == -1).all()  # new in the wide one
    assert s.cosine[:30].min() == pytest.approx(2**-0.5, abs=1e-5)  # float32 rounding
    assert s.cosine[30:60].min() == pytest.approx(3**-0.5, abs=1e-5) and s.cosine[60:90].min() == pytest.approx(
        1, abs=1e-5
    )


def test_dictionaries_over_other_spaces_are_refused_and_saved_decoders_load(seeds, tmp_path):
    _, (a, _), paths = seeds
    with pytest.raises(ConfigError, match="same hook point"):
        one_to_one(a, torch.randn(8, D + 1))
    assert torch.equal(load_decoder(paths[0]), a.W_dec.detach())
    with pytest.raises(SAELoadError, match="cannot read the decoder"):
        load_decoder(tmp_path)
