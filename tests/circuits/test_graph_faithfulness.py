"""Faithfulness of an attribution graph by intervention in the replacement model: the MLP toy's graph of its known
path keeps the behaviour on its prompt and on held-out prompts where the path applies, a wrong node set does not,
nodes that never fire on the held-out prompts are left out, and held-out prompts of another length are refused when
nodes are kept by position."""

from __future__ import annotations

import pytest
import torch

import saelab.circuits.faithfulness as faithfulness_module
import saelab.circuits.graph_faithfulness as graph_faithfulness_module
from saelab.circuits.attribution_graph import attribute, node_influence
from saelab.circuits.graph_faithfulness import GraphCheckConfig, check_held_out_lengths, graph_faithfulness
from saelab.circuits.splice import clean_states
from saelab.errors import CircuitError
from saelab.toys.attribution import B, C, mlp_graph_prompts, mlp_graph_toy

TOLERANCE = 0.02
"""How far from 1 the known path's faithfulness may be: decoder noise 0.01 leaves error nodes outside the graph, and
zero-ablating them moves the B logit by under 1%."""


@pytest.fixture(scope="module")
def toy_graph():
    toy = mlp_graph_toy(n_pos=10, a_pos=3, noise=0.01)
    return toy, attribute(toy.model, toy.transcoders, toy.tokens)


def test_the_known_path_is_faithful_where_it_was_found_and_on_held_out_prompts(toy_graph):
    toy, graph = toy_graph
    kept = {graph.node_label(i) for i in graph.node_mask.nonzero()[:, 0].tolist() if graph.node_kind(i) == "latent"}
    assert kept == {"L0/0@3", "L1/0@9"}  # the known path's latents, no others
    same = mlp_graph_prompts(32, n_pos=10, a_pos=3, seed=1)
    found = graph_faithfulness(toy.model, toy.transcoders, graph, same)
    assert found.target == B
    assert found.found_on["n"] == [2] and found.found_on["examples"] == 1
    assert found.found_on["faithfulness"][0] == pytest.approx(1.0, abs=TOLERANCE)
    assert found.found_on["completeness"][0] == pytest.approx(0.0, abs=TOLERANCE)  # nothing else carries B
    held = found.held_out
    assert held is not None and held["examples"] == 32 and held["n"] == [2] and found.held_out_silent == 0
    assert held["faithfulness"][0] == pytest.approx(1.0, abs=TOLERANCE)
    low, high = held["faithfulness_ci"][0]
    assert 1 - TOLERANCE <= low <= high <= 1 + TOLERANCE
    assert held["faithfulness_range"][0][0] >= 1 - TOLERANCE
    assert held["metric_full"] > 5 and held["metric_empty"] == pytest.approx(0.0, abs=1e-6)


def test_the_least_influential_nodes_are_not_faithful(toy_graph):
    toy, graph = toy_graph
    influence = node_influence(graph)[: graph.n_features]
    weakest = influence.argsort()[:8]
    keep = torch.zeros(graph.n_nodes, dtype=torch.bool)
    keep[weakest] = True
    same = mlp_graph_prompts(32, n_pos=10, a_pos=3, seed=1)
    wrong = graph_faithfulness(toy.model, toy.transcoders, graph, same, keep=keep)
    assert wrong.found_on["faithfulness"][0] < 0.2
    assert wrong.held_out is not None and wrong.held_out["faithfulness"][0] < 0.2
    assert wrong.found_on["completeness"][0] > 0.8  # ablating them leaves the behaviour


def test_nodes_kept_by_position_fall_silent_where_a_moves_and_by_feature_they_transfer(toy_graph):
    toy, graph = toy_graph
    moved = mlp_graph_prompts(32, n_pos=10, a_pos=6, seed=2)  # A elsewhere: L0/0 never fires at position 3
    by_pos = graph_faithfulness(toy.model, toy.transcoders, graph, moved)
    assert by_pos.held_out is not None
    assert by_pos.held_out_silent == 1 and by_pos.held_out["n"] == [1]  # L0/0@3 not counted
    assert by_pos.held_out["faithfulness"][0] < 0.2
    by_feature = graph_faithfulness(toy.model, toy.transcoders, graph, moved, cfg=GraphCheckConfig("feature"))
    assert by_feature.held_out is not None and by_feature.held_out_silent == 0
    assert by_feature.held_out["faithfulness"][0] == pytest.approx(1.0, abs=TOLERANCE)
    longer = mlp_graph_prompts(16, n_pos=14, a_pos=9, seed=3)  # another length: only the feature granularity applies
    other = graph_faithfulness(toy.model, toy.transcoders, graph, longer, cfg=GraphCheckConfig("feature"))
    assert other.held_out is not None
    assert other.held_out["faithfulness"][0] == pytest.approx(1.0, abs=TOLERANCE)


def test_a_logit_difference_and_held_out_prompts_of_another_length(toy_graph):
    toy, graph = toy_graph
    diff = graph_faithfulness(toy.model, toy.transcoders, graph, cfg=GraphCheckConfig(distractor=C))
    assert diff.distractor == C and diff.held_out is None and diff.held_out_silent == 0
    # the graph explains logit B; the nodes that raise C (head 1.1's latent, the filler detectors) are outside it, so
    # with them ablated B - C overshoots: (m(full)_B - 0) / (m(full)_B - m(full)_C) with m(empty) = 0
    full = diff.found_on["metric_full"]
    b_logit = graph_faithfulness(toy.model, toy.transcoders, graph).found_on["metric_full"]
    assert 0 < full < b_logit
    assert diff.found_on["faithfulness"][0] == pytest.approx(b_logit / full, rel=TOLERANCE)
    longer = mlp_graph_prompts(4, n_pos=12, a_pos=3)
    with pytest.raises(
        CircuitError, match=r"12 tokens long and the graph's prompt 10.*same length.*granularity 'feature'"
    ):
        graph_faithfulness(toy.model, toy.transcoders, graph, longer)
    with pytest.raises(CircuitError, match="bool mask over the graph's"):
        graph_faithfulness(toy.model, toy.transcoders, graph, keep=torch.ones(3, dtype=torch.bool))


def test_the_held_out_lengths_check_names_the_lengths_and_the_fix():
    check_held_out_lengths(10, [10, 10], "position")
    check_held_out_lengths(10, [14], "feature")  # every position: any one length
    check_held_out_lengths(10, [], "position")  # no held-out prompts
    with pytest.raises(CircuitError, match=r"2 lengths \(4, 8 tokens\); give prompts of one length"):
        check_held_out_lengths(10, [8, 4, 8], "feature")
    with pytest.raises(
        CircuitError, match=r"14 tokens long and the graph's prompt 10.*same length.*\(or --granularity feature,"
    ):
        check_held_out_lengths(10, [14], "position", fix="--granularity feature")


def test_the_clean_states_are_computed_once_per_set_of_prompts(toy_graph, monkeypatch):
    toy, graph = toy_graph
    calls: list[int] = []

    def counted(model, saes, tokens):
        calls.append(len(tokens))
        return clean_states(model, saes, tokens)

    monkeypatch.setattr(graph_faithfulness_module, "clean_states", counted)
    monkeypatch.setattr(faithfulness_module, "clean_states", counted)
    same = mlp_graph_prompts(32, n_pos=10, a_pos=3, seed=1)
    graph_faithfulness(toy.model, toy.transcoders, graph, same)
    assert calls == [1, 32]  # the graph's prompt, then the held-out prompts: one forward pass each
