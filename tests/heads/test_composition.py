"""Composition scores between heads (Elhage et al. 2021) against TransformerLens, and the SVD channels (Merullo et
al. 2024) on the induction model, whose previous-token head feeds the induction head's keys."""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens import FactoredMatrix, HookedTransformer
from transformer_lens.utils import composition_scores as tl_composition_scores

from saelab.errors import HeadsError
from saelab.heads import MODES, CompositionScores, Head, channel, composition_scores, mode_scores
from saelab.plots import channel_figure, composition_figure
from saelab.run import RunDir


def assert_scores_equal_transformer_lens(model: HookedTransformer) -> None:
    for mode in MODES:
        ours, theirs = mode_scores(model, mode), model.all_composition_scores(mode)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=1e-4)


def test_scores_equal_transformer_lens_on_the_induction_model(model):
    assert_scores_equal_transformer_lens(model)


def test_scores_equal_transformer_lens_on_a_multihead_model(multihead):
    assert_scores_equal_transformer_lens(multihead)


def test_scores_equal_transformer_lens_on_a_grouped_query_model(grouped_query):
    assert_scores_equal_transformer_lens(grouped_query)


def test_k_composition_from_the_previous_token_head_into_the_induction_head_is_the_top_pair(model):
    top = composition_scores(model).top_pairs(3)
    assert [p.mode for p in top] == ["K", "Q", "V"]
    assert (top[0].writer, top[0].reader) == (Head(0, 0), Head(1, 0))
    assert top[0].score > 2 * top[1].score, top


def test_the_induction_models_k_channel_has_eight_dimensions(model):
    """Measured: the previous-token head's `W_OV` has eight large singular values, the induction head's `W_QK` too,
    and their top-8 subspaces carry 98.7% of the K-composition, while no few singular vectors do."""
    c = channel(model, (0, 0), (1, 0), mode="K")
    assert c.share(8, 8) >= 0.9 and c.share(4, 4) <= 0.6 and c.share(1) <= 0.3, (c.share(8, 8), c.share(4, 4))


def test_top_pairs_on_a_multihead_model_are_sorted_and_cross_layers(multihead):
    pairs = composition_scores(multihead).top_pairs(20)
    assert len(pairs) == 20 and [p.score for p in pairs] == sorted((p.score for p in pairs), reverse=True)
    assert all(p.reader.layer > p.writer.layer for p in pairs)


@pytest.mark.parametrize("mode", MODES)
def test_channel_decomposes_the_composition_exactly(model, mode):
    c = channel(model, (0, 0), (1, 0), mode=mode)
    assert c.score == pytest.approx(float(mode_scores(model, mode)[0, 0, 1, 0]), rel=1e-5)
    assert float(c.energy.sum()) == pytest.approx(1.0, abs=1e-6) and c.share(32) == pytest.approx(1.0, abs=1e-6)
    assert bool((c.writer_singular_values[:-1] >= c.writer_singular_values[1:]).all())
    # the paper's score per component: its code's composition score of the rank-1 matrix s_i u_i v_i^T with R
    U, S, V = model.blocks[0].attn.OV[0].svd()
    reader = {"Q": model.blocks[1].attn.QK[0], "K": model.blocks[1].attn.QK[0].T, "V": model.blocks[1].attn.OV[0]}
    for i in range(3):
        keep = torch.zeros_like(S)
        keep[i] = S[i]
        component = FactoredMatrix(U * keep.sqrt()[None], keep.sqrt()[:, None] * V.T)
        expected = tl_composition_scores(component, reader[mode]).item()
        assert float(c.component_scores[i]) == pytest.approx(expected, rel=1e-4)


def test_a_rank_one_reader_takes_the_whole_channel_through_its_one_direction(multihead):
    """A planted channel: the reader's keys read one direction of the residual stream, so every bit of K-composition
    goes through its first component, split over the writer's components as `s_i^2 (v_i . d)^2`."""
    planted = copy.deepcopy(multihead)
    d = torch.randn(planted.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        planted.blocks[2].attn.W_K[1] = torch.outer(d, torch.randn(planted.cfg.d_head))
    c = channel(planted, (0, 3), (2, 1), mode="K")
    assert c.share(planted.cfg.d_head, 1) == pytest.approx(1.0, abs=1e-5)
    assert channel(multihead, (0, 3), (2, 1), mode="K").share(planted.cfg.d_head, 1) < 0.5  # unplanted: spread out
    _, s, v = torch.linalg.svd(planted.OV[0, 3].AB.double())
    rank = planted.cfg.d_head
    expected = (s[:rank] ** 2 * (v[:rank] @ (d.double() / d.norm())) ** 2).float()
    torch.testing.assert_close(c.energy.sum(1), expected / expected.sum(), atol=1e-5, rtol=1e-4)


def test_scores_round_trip_through_the_run_and_draw(model, tmp_path):
    scores = composition_scores(model)
    path = scores.save(RunDir(tmp_path).heads("composition"))
    assert path == tmp_path / "heads" / "composition.json"
    loaded = CompositionScores.load(path)
    assert loaded.model == scores.model and loaded.labels == ["L0H0", "L1H0"]
    for mode in MODES:
        torch.testing.assert_close(loaded.scores[mode], scores.scores[mode])
    figure = composition_figure(loaded, "K")
    assert figure["data"][0]["z"][0][1] == pytest.approx(float(scores.scores["K"][0, 0, 1, 0]))
    assert len(channel_figure(channel(model, (0, 0), (1, 0)), rank=4)["data"][0]["z"]) == 4
    path.write_text('{"model": "m", "scores": {"K": [[1.0]]}}')
    with pytest.raises(HeadsError, match="compute it again"):
        CompositionScores.load(path)


def test_bad_requests_name_the_fix(model):
    with pytest.raises(HeadsError, match="one of"):
        mode_scores(model, "O")  # pyright: ignore[reportArgumentType]
    with pytest.raises(HeadsError, match="later layer"):
        channel(model, (1, 0), (0, 0))
    with pytest.raises(HeadsError, match="not in the model"):
        channel(model, (0, 0), (1, 3))
