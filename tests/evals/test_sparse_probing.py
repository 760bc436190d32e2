"""k-sparse probing: known answers on a planted feature, agreement with sklearn's logistic regression, the built-in
tasks' labels, and errors naming the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.dictionaries import SAE, SAEConfig
from saelab.errors import ConfigError
from saelab.evals.sparse_probing import (
    ProbingTask,
    SparseProbingConfig,
    SparseProbingResult,
    code_literal_task,
    corpus_packages,
    fit_logistic,
    k_sparse_probes,
    mean_difference_order,
    package_task,
    sparse_probing,
    token_label_task,
    wilson_interval,
)


class Planted:
    """Codes of `n_features` independent sparse features and their activations `x = codes @ rotation` (a random
    orthogonal matrix, so every feature is spread over all `d` raw dimensions), and the SAE whose latent `j` is
    exactly feature `j` (encoder = the rotation's transpose, ReLU)."""

    def __init__(self, n_rows: int = 6000, d: int = 128, *, p: float = 0.08, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rotation = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
        fires = torch.rand(n_rows, d, generator=g) < p
        self.codes = fires * (0.5 + torch.rand(n_rows, d, generator=g))
        self.x = self.codes @ self.rotation
        self.docs = np.arange(n_rows) // 10  # ten rows a document
        self.sae = SAE.from_config(SAEConfig(arch="relu", d_in=d, d_sae=d, k=1))
        with torch.no_grad():
            self.sae.W_enc.copy_(self.rotation.T)
            self.sae.b_enc.zero_()
            self.sae.b_dec.zero_()
            self.sae.W_dec.copy_(self.rotation)


@pytest.fixture(scope="module")
def planted() -> Planted:
    return Planted()


def test_the_planted_latent_is_found_at_k1_and_the_raw_dimensions_fall_short(planted):
    """Label: feature 0 fires. Latent 0 is the feature itself, so the 1-sparse probe on the latents picks it and is
    (nearly) perfect; feature 0 is spread over 128 raw dimensions (at most ~0.3 of it on any one), so no single raw
    dimension separates it from the other features' sum."""
    assert torch.allclose(planted.sae.encode(planted.x[:100]), planted.codes[:100], atol=1e-5)
    task = ProbingTask("planted", "token", np.arange(len(planted.x)), {"f0": planted.codes[:, 0].numpy() > 0})
    out = sparse_probing(planted.x, planted.docs, task, encode=planted.sae.encode)
    (label,) = out.labels
    k1 = label.latents[0]
    assert (k1.k, k1.features) == (1, [0])
    assert k1.f1 >= 0.95 and k1.accuracy >= 0.95
    assert k1.accuracy_low <= k1.accuracy <= k1.accuracy_high and k1.accuracy_high - k1.accuracy_low < 0.05
    raw1 = label.raw[0]
    assert raw1.f1 <= k1.f1 - 0.2 and raw1.accuracy <= 0.8
    assert label.raw[-1].k == 20 and label.raw[-1].accuracy > raw1.accuracy  # more dimensions recover more of it
    assert label.raw_all is not None and label.raw_all.k == 128  # the feature is linear in the raw space: all
    assert label.raw_all.accuracy >= 0.95  # 128 dimensions find it, it is only spread out
    assert label.n_train <= 4000 and label.n_test <= 1000 and label.n_train % 2 == 0
    assert out.k_values() == [1, 2, 5, 10, 20]


def test_document_level_pools_each_document(planted):
    """Label: feature 0 fires somewhere in the document (ten rows). The mean-pooled latent 0 is positive exactly
    there, so its 1-sparse probe is (nearly) perfect."""
    ids = np.unique(planted.docs)
    fired = np.zeros(len(ids), dtype=bool)
    np.logical_or.at(fired, planted.docs, planted.codes[:, 0].numpy() > 0)
    assert 0.3 < fired.mean() < 0.7
    task = ProbingTask("fired", "document", ids, {"f0": fired})
    out = sparse_probing(
        planted.x, planted.docs, task, encode=planted.sae.encode, config=SparseProbingConfig(k_values=(1, 5))
    )
    (label,) = out.labels
    assert label.latents[0].features == [0] and label.latents[0].f1 >= 0.95
    assert label.raw[0].f1 <= label.latents[0].f1 - 0.1
    assert label.n_test + label.n_train <= len(ids)


def test_selection_reads_the_size_of_the_mean_difference_not_its_sign():
    """SAEBench ranks features by `|mean(pos) - mean(neg)|`: a feature lower on the positives is chosen first."""
    y = np.arange(200) % 2 == 0
    x = torch.zeros(200, 3)
    x[:, 0] = torch.from_numpy(~y).float() * 3  # -3 on the positives, relative to the negatives
    x[:, 1] = torch.from_numpy(y).float()  # +1
    x[:, 2] = torch.linspace(0, 1, 200)
    assert mean_difference_order(x, y).tolist() == [0, 1, 2]
    probes = k_sparse_probes(x[:100], y[:100], x[100:], test_y=y[100:], config=SparseProbingConfig(k_values=(1,)))
    assert probes[0].features == [0] and probes[0].accuracy == 1.0


def test_wilson_interval():
    """Known values (Wilson 1927; e.g. 8 of 10: 0.490 to 0.943) and the ends: inside [0, 1], not empty."""
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(0.8389, abs=1e-4)


def test_fit_logistic_matches_sklearn():
    """The torch fit minimises sklearn's objective (`LogisticRegression(C=1)`): same weights to 1e-4."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 5, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0], dtype=torch.float64) + 0.3 * torch.randn(400, generator=g)) > 0
    w, b = fit_logistic(x, y, c=1.0)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(w.numpy(), ref.coef_[0], atol=1e-4)
    assert abs(float(b) - ref.intercept_[0]) < 1e-4


def test_code_literal_labels_tokens_between_backticks():
    strings = ["a", "`", "x", "``", " ", "y"]  # 1 and 3 are backtick tokens
    tokens = np.array([0, 3, 2, 3, 0, 1, 2, 1, 0, 1, 2])
    docs = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, -1])
    task = code_literal_task(tokens, docs, strings)
    # rows: a ``x`` a `x | ` a (doc 1: an open literal) | framing
    assert task.units.tolist() == [0, 2, 4, 6, 8]
    assert task.labels["code_literal"].tolist() == [False, True, False, True, True]


def test_token_labels_in_the_absorption_format():
    strings = ["the", "def", "class", "cat"]
    tokens = np.array([0, 1, 2, 3, 1, 0])
    task = token_label_task(tokens, strings, {"def": "keyword", "class": "keyword", "cat": "animal"})
    assert task.units.tolist() == [1, 2, 3, 4]
    assert task.labels["keyword"].tolist() == [True, True, False, True]
    assert task.labels["animal"].tolist() == [False, False, True, False]
    with pytest.raises(ConfigError, match="give labels that name tokens"):
        token_label_task(tokens, strings, {"dog": "animal"})


def test_package_task_labels_the_largest_packages():
    packages = corpus_packages()
    docs = np.arange(len(packages))
    task = package_task(docs, n_packages=3)
    assert len(task.labels) == 3 and task.units.tolist() == docs.tolist()
    counts = {p: int(m.sum()) for p, m in task.labels.items()}
    assert counts == {p: packages.count(p) for p in counts}
    assert min(counts.values()) >= max(packages.count(p) for p in set(packages) - set(counts))


def test_a_label_too_rare_to_probe_is_refused(planted):
    marks = np.zeros(len(planted.x), dtype=bool)
    marks[:3] = True
    task = ProbingTask("rare", "token", np.arange(len(planted.x)), {"rare": marks})
    with pytest.raises(ConfigError, match="label 'rare' has .* give more rows or documents, or drop the label"):
        sparse_probing(planted.x, planted.docs, task, encode=planted.sae.encode)


def test_labels_are_bools_or_zero_one(planted):
    """0/1 labels are read as bools; class indices are refused, not read as row indices."""
    task = ProbingTask("ints", "token", np.arange(10), {"a": np.array([0, 1] * 5)})
    assert task.labels["a"].dtype == bool and task.labels["a"].sum() == 5
    with pytest.raises(ConfigError, match="must mark each unit True or False"):
        ProbingTask("classes", "token", np.arange(10), {"a": np.arange(10) % 3})


def test_result_round_trips_through_json(planted, tmp_path):
    task = ProbingTask("planted", "token", np.arange(2000), {"f1": planted.codes[:2000, 1].numpy() > 0})
    out = sparse_probing(
        planted.x, planted.docs, task, encode=planted.sae.encode, config=SparseProbingConfig(k_values=(1,))
    )
    result = SparseProbingResult("h", "v", [out], {"seed": 42})
    back = SparseProbingResult.load(result.save(tmp_path / "sp.json"))
    assert back == result
    assert "k=1" in back.tasks[0].summary()
