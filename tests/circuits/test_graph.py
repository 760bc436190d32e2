"""Sparse feature circuits on a model whose circuit is known: a two-layer attention-only decoder trained until it
does induction (a previous-token head in layer 0 feeding an induction head in layer 1), with a TopK SAE on each
layer's attn.hook_z (the `induction_run` fixture)."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.circuits import Circuit, CircuitError, aggregate, find_circuit, repeated_tokens
from saelab.models import capture, resolve_hooks
from saelab.toys.induction import INDUCTION_HOOKS
from tests.circuits.helpers import L0, L1, LENGTH, POS, SOURCE


def eta2(values: torch.Tensor, groups: torch.Tensor) -> float:
    """The fraction of the variance of `values` explained by the group (token) they belong to."""
    values, groups = values.flatten().double(), groups.flatten()
    sums = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, values)
    means = sums / torch.bincount(groups).clamp_min(1)
    return float(1 - ((values - means[groups]) ** 2).sum() / ((values - values.mean()) ** 2).sum())


def test_the_circuit_is_the_induction_circuit(model, saes, circuit):
    """Layer-1 latents at the metric's position, fed by layer-0 previous-token latents at the position after the
    earlier occurrence of the current token; a few nodes recover the behaviour."""
    top = circuit.nodes[:5]
    assert all((n.hook, n.position) in ((L1, POS), (L0, SOURCE)) for n in top), top
    heads = [n for n in circuit.nodes if n.hook == L1 and n.latent != "err"][:3]
    assert circuit.nodes.index(heads[0]) < 3 and all(n.position == POS for n in heads)
    sources = []
    for node in heads:
        incoming = sorted((e for e in circuit.edges if e.dst == node.key), key=lambda e: -abs(e.weight))
        assert incoming, f"no edges into {node.key}"
        src = next(n for n in circuit.nodes if n.key == incoming[0].src)
        assert (src.hook, src.position) == (L0, SOURCE) and src.latent != "err", incoming[:3]
        sources.append(src.latent)
    # those layer-0 latents read the previous token: on fresh sequences it explains their activation
    tokens = repeated_tokens(512, LENGTH, seed=99)
    f = capture(model, tokens, resolve_hooks(model, [L0]))[L0]
    with torch.no_grad():
        acts = saes[L0].encode(f)[:, 1:]
    for latent in set(sources):
        previous, current = eta2(acts[..., latent], tokens[:, :-1]), eta2(acts[..., latent], tokens[:, 1:])
        assert previous > 0.5 and previous > 3 * current, (latent, previous, current)
    curve = circuit.curves
    small = min(n for n, f in zip(curve["n"], curve["faithfulness"]) if f >= 0.8)
    assert small <= 32 and curve["completeness"][curve["n"].index(small)] < 0.3, curve


def test_aggregating_over_positions_sums_the_effects(model, saes, task, ig):
    summed = find_circuit(model, saes, task, aggregation="sum", curve_sizes=[1, 4, 16], progress=False)
    assert summed.nodes and all(n.position is None for n in summed.nodes)
    per_latent = {h: aggregate(ig.effects[h], "none").sum(0) for h in INDUCTION_HOOKS}
    for n in summed.nodes[:10]:
        index = saes[n.hook].cfg.d_sae if n.latent == "err" else n.latent
        assert n.effect == pytest.approx(float(per_latent[n.hook][index]), rel=1e-4, abs=1e-5)
    assert summed.edges and summed.curves["n"] == [1, 4, 16]


def test_a_circuit_survives_a_json_round_trip(circuit, tmp_path):
    path = circuit.save(tmp_path / "c.json")
    assert Circuit.load(path) == circuit
    assert json.loads(path.read_text())["nodes"][0]["hook"] in INDUCTION_HOOKS
    with pytest.raises(CircuitError, match="saelab circuit"):
        Circuit.load(tmp_path / "missing.json")
