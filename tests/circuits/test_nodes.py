"""Node effects on the induction model: attribution patching and integrated gradients against exact patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.circuits import aggregate, exact_patching, node_effects, spliced_output
from saelab.models import capture, resolve_hooks
from saelab.toys.induction import INDUCTION_HOOKS
from tests.circuits.helpers import L1


def corr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("baseline", ["patch", "zero", "mean"])
def test_attribution_patching_is_exact_where_the_metric_is_linear(model, saes, task, baseline):
    """The logit is linear in layer 1's hook_z (no LayerNorm, no later layer), so one gradient is exact there."""
    last = {L1: saes[L1]}
    atp = node_effects(model, last, task, method="atp", baseline=baseline, progress=False)
    exact = exact_patching(model, last, task, baseline=baseline, progress=False)
    assert exact[L1].abs().max() > 0.5
    torch.testing.assert_close(aggregate(atp.effects[L1], "none"), exact[L1], atol=2e-3, rtol=1e-3)


def test_integrated_gradients_add_up_to_patching_the_whole_hook_point(model, saes, task, ig):
    """Completeness of integrated gradients: a hook point's node effects sum to the effect of patching it all."""
    with torch.no_grad():
        clean = task.metric(model(task.tokens))
        patched = capture(model, task.patch, resolve_hooks(model, INDUCTION_HOOKS))
        for hook in INDUCTION_HOOKS:
            moved = task.metric(spliced_output(model, task.tokens, {hook: lambda x, a=patched[hook]: a})) - clean
            summed = ig.effects[hook].sum((1, 2))
            assert moved.abs().mean() > 1
            torch.testing.assert_close(summed, moved, atol=0.05, rtol=0.02)


def test_integrated_gradients_agree_with_exact_patching(model, saes, task, ig):
    exact = exact_patching(model, saes, task, baseline="patch", progress=False)
    ig_all = torch.cat([aggregate(ig.effects[h], "none").flatten() for h in INDUCTION_HOOKS])
    exact_all = torch.cat([exact[h].flatten() for h in INDUCTION_HOOKS])
    moved = (ig_all != 0) | (exact_all != 0)
    assert moved.sum() > 100
    r = corr(ig_all[moved], exact_all[moved])
    assert r >= 0.9, f"integrated gradients against exact patching: r = {r:.3f}"
