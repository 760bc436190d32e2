"""Splicing SAEs into the induction model: `dec(enc(x)) + err` in place of `x` leaves its output unchanged."""

from __future__ import annotations

import pytest
import torch

from saelab.circuits import encode_nodes, faithfulness_curve, spliced_output


def spliced(model, saes, tokens):
    """The model's logits with every SAE spliced in as dec(enc(x)) + err."""

    def splice(sae):
        def edit(x):
            nodes = encode_nodes(sae, x)
            return sae.decode(nodes.f) + nodes.err

        return edit

    with torch.no_grad():
        return spliced_output(model, tokens, {h: splice(s) for h, s in saes.items()})


def test_splicing_the_saes_leaves_the_output_unchanged(model, saes, task):
    with torch.no_grad():
        plain = model(task.tokens)
    torch.testing.assert_close(spliced(model, saes, task.tokens), plain, atol=1e-4, rtol=1e-4)
    # and so keeping every node is the whole model: faithfulness 1, completeness 0
    shapes = {h: (task.tokens.shape[1], s.cfg.d_sae + 1) for h, s in saes.items()}
    every = [(h, p, i) for h, (n_pos, n) in shapes.items() for p in range(n_pos) for i in range(n)]
    curve = faithfulness_curve(model, saes, task, ranking=every, sizes=[len(every)])
    assert curve["faithfulness"][0] == pytest.approx(1, abs=1e-4)
    assert curve["completeness"][0] == pytest.approx(0, abs=1e-4)
