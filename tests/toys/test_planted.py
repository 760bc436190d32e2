"""Planted absorption (saelab.toys.planted) as the known answer of the absorption metric: child latents absorb their
parent under a hierarchy, nothing is absorbed without one, a trained SAE learns the same, and results round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.absorption import AbsorptionError, AbsorptionResult, AbsorptionSettings, absorption_result, single_thread
from saelab.dictionaries import SAE, SAEConfig, train_step
from saelab.run import RunDir
from saelab.toys.planted import planted_absorption, planted_probe_data

FAST = AbsorptionSettings(probe_batch_size=1024)  # the metric's known answers do not depend on the probe's batch


@pytest.fixture(scope="module")
def planted():
    """Parents with 20 children each; a child fires on 40% of a parent's rows and never without its parent."""
    p = planted_absorption(n_rows=20_000, hierarchy=True)
    data = planted_probe_data(p, s=FAST)
    return p, absorption_result(p.sae, data, "synthetic", variant="absorbing", s=FAST), data


@pytest.fixture(scope="module")
def control():
    """The same features, children independent of the label, and one latent per feature."""
    p = planted_absorption(n_rows=20_000, hierarchy=False)
    data = planted_probe_data(p, s=FAST)
    return p, absorption_result(p.sae, data, "synthetic", variant="control", s=FAST), data


def test_planted_absorption_is_found_in_the_child_latents(planted):
    p, result, _ = planted
    cut = int(len(p.x) * 0.8)
    child = p.child[cut:]
    for c, lab in enumerate(result.labels):
        assert lab.probe_f1 == 1.0 and lab.true_positives == int((p.y[cut:] == c).sum())
        assert p.parent_latent[c] in lab.split_latents  # the parent latent is the label's main latent
        split_children = {p.child_latent.index(i) for i in lab.split_latents if i in p.child_latent}
        # every row with a child outside the split is fully absorbed by that child's latent, and nothing else is
        expected = [
            w
            for w, k in zip(np.array(p.words[cut:])[p.y[cut:] == c], child[p.y[cut:] == c])
            if k >= 0 and k not in split_children
        ]
        assert sorted(case.word for case in lab.cases) == sorted(expected)
        for case in lab.cases:
            kid = int(case.word.split(".c")[1])
            assert case.full_absorption and case.absorption_fraction == 1.0
            assert case.split_acts == [0.0] * len(lab.split_latents)
            assert [int(a[0]) for a in case.absorbers] == [p.child_latent[kid]]
            assert case.absorbers[0][2] >= 0.1  # the child's decoder (u_p + u_c)/sqrt2 carries the probe direction
        assert lab.mean_absorption_fraction == pytest.approx(len(expected) / lab.true_positives)
        assert lab.full_absorption_rate == lab.mean_absorption_fraction
    assert 0.3 < result.mean_absorption_fraction < 0.45  # 40% of rows have a child, minus split children
    assert result.n_scored == 4 and not result.enough_labels  # 4 labels < SAEBench's 20


def test_independent_features_score_zero(control):
    _, result, _ = control
    assert result.mean_absorption_fraction == 0.0 and result.mean_full_absorption_rate == 0.0
    assert all(not lab.cases and lab.split_latents == [c] for c, lab in enumerate(result.labels))


def _trained(planted, steps: int = 1500):
    """A ReLU SAE (L1) with one latent per feature, trained on the planted activations."""
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(arch="relu", d_in=planted.x.shape[1], d_sae=len(planted.directions), l1_coef=0.3))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with single_thread():  # a 128 x 84 SAE: threads only add overhead
        for _ in range(steps):
            train_step(sae, opt, planted.x[torch.randint(0, len(planted.x), (512,), generator=g)])
    return sae.eval()


def test_a_trained_sae_learns_to_absorb_only_under_a_hierarchy(planted, control):
    """Sparsity alone makes a trained SAE absorb parents into children: full absorption appears with the
    hierarchy and not without it, and the absorbing latents are the words' own children."""
    p, _, data = planted
    sae = _trained(p)
    absorbing = absorption_result(sae, data, "synthetic", variant="trained", s=FAST)
    independent = absorption_result(_trained(control[0]), control[2], "synthetic", variant="trained-control", s=FAST)
    assert absorbing.mean_absorption_fraction is not None and absorbing.mean_full_absorption_rate is not None
    assert independent.mean_absorption_fraction is not None and independent.mean_full_absorption_rate is not None
    assert absorbing.mean_full_absorption_rate > 0.3 and independent.mean_full_absorption_rate < 0.01
    assert absorbing.mean_absorption_fraction > 2.5 * independent.mean_absorption_fraction
    children = p.directions[len(p.classes) :]
    for lab in absorbing.labels:
        for case in [x for x in lab.cases if x.full_absorption]:
            latent = int(case.top[0][0])
            kid = int(case.word.split(".c")[1])
            decoder = sae.W_dec[latent].detach()
            assert torch.cosine_similarity(decoder, children[kid], dim=0) > 0.5  # the word's child feature


def test_results_round_trip_through_json(planted, tmp_path):
    _, result, _ = planted
    path = result.save(RunDir(tmp_path).absorption("synthetic", "absorbing"))
    assert path == tmp_path / "absorption" / "synthetic" / "absorbing.json"
    assert AbsorptionResult.load(path) == result
    path.write_text("[]")
    with pytest.raises(AbsorptionError, match="not a saelab absorption result"):
        AbsorptionResult.load(path)
    with pytest.raises(AbsorptionError, match="saelab absorption CONFIG.yaml"):
        AbsorptionResult.load(tmp_path / "missing.json")


def test_the_analysis_keeps_the_old_names_of_the_toy():
    """`saelab.absorption.planted_absorption` etc. still resolve (lazily: the analysis does not import the toys)."""
    import saelab.absorption as ab
    import saelab.toys.planted as toy

    assert ab.planted_absorption is toy.planted_absorption and ab.planted_probe_data is toy.planted_probe_data
    assert ab.Planted is toy.Planted
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ab.nope


def test_sparse_parents_and_weaker_children():
    """`parent_prob`: the other rows hold noise alone and stay out of the probe data; `child_norm` scales children;
    the default rows are unchanged by either option."""
    p = planted_absorption(n_rows=2000, n_parents=2, n_children=3, d=16, parent_prob=0.5, child_norm=0.5, noise=0.0)
    none = p.y < 0
    assert (
        0.4 < none.mean() < 0.6 and (p.child[none] < 0).all() and {p.words[i] for i in np.nonzero(none)[0]} == {"none"}
    )
    assert torch.all(p.x[torch.from_numpy(none)] == 0)
    with_child = torch.from_numpy(p.child >= 0)
    torch.testing.assert_close(p.x[with_child].norm(dim=1), torch.full((int(with_child.sum()),), 1.25**0.5))
    data = planted_probe_data(p, s=FAST)
    assert len(data.train_y) + len(data.test_y) == int((~none).sum()) and (data.test_y >= 0).all()
    default = planted_absorption(n_rows=500, n_parents=2, n_children=3, d=16)
    torch.testing.assert_close(
        planted_absorption(n_rows=500, n_parents=2, n_children=3, d=16, parent_prob=1.0).x, default.x
    )
