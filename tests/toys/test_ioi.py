"""The IOI toy: a two-layer attention-only decoder whose one trained head per layer does IOI (the layer-0 head finds
the repeated subject from the end token, the layer-1 head moves the other name there) next to two distractor heads
per layer left at their random initialisation."""

from __future__ import annotations

import pytest
import torch

from saelab.circuits.tasks import Task, token_metric
from saelab.heads.discrete import patching_effects
from saelab.toys.ioi import N_CTX, ioi_accuracy, ioi_prompts, ioi_texts


@pytest.fixture(scope="module")
def prompts():
    return ioi_prompts(256, seed=5)


def test_the_model_names_the_indirect_object(ioi_model):
    assert ioi_accuracy(ioi_model) >= 0.95


def test_negative_prompts_have_the_positive_tokens_but_one_name(prompts):
    assert prompts.positive.shape == prompts.negative.shape == (256, N_CTX)
    differ = prompts.positive != prompts.negative
    assert differ.sum(1).eq(1).all() and differ[torch.arange(256), prompts.s2].all()
    assert (prompts.positive[torch.arange(256), prompts.s2] == prompts.subject).all()
    texts = ioi_texts(ioi_prompts(2, seed=0))
    assert all(len(t.clean) == len(t.patch or "") == N_CTX - 1 for t in texts)


def test_the_trained_heads_attend_as_their_roles_and_carry_the_task(ioi_model, prompts):
    """Named by their attention at the end token: layer 0's trained head looks at the repeated subject (S2), layer
    1's at the IO; patching either from the negative prompts removes most of the logit difference, patching any
    distractor almost none of it."""
    _, cache = ioi_model.run_with_cache(prompts.positive)
    rows = torch.arange(len(prompts.io))
    io_at = torch.where(prompts.positive[:, 1] == prompts.io, 1, 2)
    s2 = cache["blocks.0.attn.hook_pattern"][rows, :, -1, prompts.s2].mean(0)  # [head]
    io = cache["blocks.1.attn.hook_pattern"][rows, :, -1, io_at].mean(0)
    assert s2.argmax() == 0 and s2[0] > 0.3 and s2[1:].max() < 0.2, s2
    assert io.argmax() == 0 and io[0] > 0.8 and io[1:].max() < 0.2, io
    n = len(prompts.io)
    metric = token_metric("logit_diff", torch.full((n,), N_CTX - 1), prompts.io, distractor=prompts.subject)
    with torch.no_grad():
        clean = float(metric(ioi_model(prompts.positive)).mean())
    drops = patching_effects(ioi_model, Task(prompts.positive, metric, prompts.negative)) / clean
    assert drops[0] > 0.5 and drops[3] > 0.5, drops
    assert drops[[1, 2, 4, 5]].abs().max() < 0.05, drops
