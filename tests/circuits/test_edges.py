"""Edges on the induction model: the direct Jacobian times the upstream change, against finite differences."""

from __future__ import annotations

import pytest
import torch

from saelab.circuits import aggregate, edge_effects, spliced_output
from saelab.circuits.splice import Edit
from tests.circuits.helpers import L0, L1, POS, SOURCE


def test_edges_are_the_direct_jacobian_times_the_upstream_change(model, saes, task, ig):
    """At the clean input, edge(u -> d) = grad_d * (d d / d u) * delta_u: check it against finite differences,
    moving one layer-0 node a small step towards its patch value and reading the layer-1 latent."""
    latent = int(aggregate(ig.effects[L1], "none")[POS, :-1].abs().argmax())
    error = saes[L0].cfg.d_sae
    ups = [(SOURCE, int(i)) for i in aggregate(ig.effects[L0], "none")[SOURCE, :-1].abs().topk(3).indices] + [
        (SOURCE, error)
    ]
    weights = edge_effects(
        model, saes, task, effects=ig, up=L0, down=L1, up_nodes=ups, down_nodes=[(POS, latent)], steps=1
    )[0]
    clean, delta, grad = ig.clean[L0], ig.deltas[L0], ig.grads[L1].f[:, POS, latent]

    def latent_after(f, err):
        read = {}
        with torch.no_grad():
            edits: dict[str, Edit] = {L0: lambda x: saes[L0].decode(f) + err, L1: lambda x: read.setdefault("x", x)}
            spliced_output(model, task.tokens, edits)
            return saes[L1].encode(read["x"])[:, POS, latent]

    eps = 1e-2
    base = latent_after(clean.f, clean.err)
    for (p, i), weight in zip(ups, weights.tolist()):
        f, err = clean.f.clone(), clean.err.clone()
        if i == error:
            err[:, p] += eps * delta.err[:, p]
        else:
            f[:, p, i] += eps * delta.f[:, p, i]
        finite = float(((latent_after(f, err) - base) / eps * grad).mean())
        assert weight == pytest.approx(finite, rel=0.05, abs=1e-3), (p, i)
    assert weights.abs().max() > 0.05
