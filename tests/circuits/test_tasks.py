"""Tasks from prompts: on the induction model (logit differences) and on MiniLM (the similarity metric)."""

from __future__ import annotations

import pytest
import torch

from saelab.circuits import CircuitError, Prompt, find_circuit, node_effects, prompt_task, spliced_output
from saelab.models import capture, resolve_hooks
from saelab.sae import SAE, SAEConfig
from tests.circuits.helpers import L1


def test_prompt_tasks_on_the_induction_model(model, saes):
    """Prompts in the model's own alphabet: `...Qz7...Q` should continue with `z`, unless the first part is patched."""
    prompts = [
        Prompt(clean="Qz7bKDmQ", patch="aX7bKDmQ", target="z", distractor="X"),
        Prompt(clean="Hr2cYwpH", patch="Jf2cYwpH", target="r", distractor="f"),
    ]
    task = prompt_task(model, prompts, "logit_diff")
    assert task.patch is not None
    with torch.no_grad():
        clean, patched = task.metric(model(task.tokens)), task.metric(model(task.patch))
    assert (clean > 2).all() and (patched < clean - 2).all()
    found = find_circuit(model, saes, task, progress=False)
    last = task.tokens.shape[1] - 1
    assert found.labels[-1] == "Q"
    assert next(n for n in found.nodes if n.hook == L1).position == last
    with pytest.raises(CircuitError, match="same length"):
        prompt_task(model, [Prompt(clean="Qz7bQ", target="z"), Prompt(clean="Qz7Q", target="z")], "logit")
    with pytest.raises(CircuitError, match="exactly one token"):
        prompt_task(model, [Prompt(clean="Qz7bQ", target="z7")], "logit")
    with pytest.raises(CircuitError, match="similarity"):
        prompt_task(model, [Prompt(clean="Qz7bQ", target="z")], "similarity")
    with pytest.raises(CircuitError, match="patch input"):
        node_effects(model, saes, prompt_task(model, [Prompt(clean="Qz7bQ", target="z")], "logit"), progress=False)


def test_encoders_get_a_similarity_metric_and_exact_splicing(minilm):
    """MiniLM: the metric is the cosine similarity of the pooled output embedding to a reference text's."""
    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(d_in=384, d_sae=768, k=16)).eval()
    prompts = [Prompt(clean="the cat sat on the mat", patch="a dog ran in the park", target="a cat on a mat")]
    task = prompt_task(minilm, prompts, "similarity")
    assert task.patch is not None
    with torch.no_grad():
        clean = task.metric(spliced_output(minilm, task.tokens, {}))
        assert clean.item() > task.metric(spliced_output(minilm, task.patch, {})).item()
    ig = node_effects(minilm, {hook: sae}, task, method="ig", ig_steps=16, baseline="patch", progress=False)
    with torch.no_grad():
        patched = capture(minilm, task.patch, resolve_hooks(minilm, [hook]))[hook]
        moved = task.metric(spliced_output(minilm, task.tokens, {hook: lambda x: patched})) - clean
    assert abs(float(moved)) > 0.05
    assert float(ig.effects[hook].sum()) == pytest.approx(float(moved), rel=0.03)
