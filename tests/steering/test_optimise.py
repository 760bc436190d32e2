"""Sparse codes found by gradient descent (saelab.steering.optimise) steer an encoder and a decoder toward targets."""

from __future__ import annotations

import torch

from saelab import steering as st
from saelab.steering import EMBEDDING, Intervention
from tests.steering.helpers import HOOK


def test_optimised_code_steers_the_query_toward_the_targets(minilm, corpus, emb_sae):
    docs, emb = corpus
    targets = docs[100:103]
    goal = torch.nn.functional.normalize(emb[100:103].mean(0), dim=-1)
    query = "Open a network connection to a host."
    code, losses = st.optimise_code(minilm, emb_sae, EMBEDDING, targets=targets, query=query, steps=60, lr=0.05)
    assert losses[-1] < 0.5 * losses[0] and int((code > 0).sum()) <= emb_sae.cfg.k
    steered = st.embed(minilm, [query], [Intervention(EMBEDDING, emb_sae, [], "add", 1.0, code=code)])[0]
    assert float(steered @ goal) > float(st.embed(minilm, [query])[0] @ goal) + 0.2
    r = st.search(minilm, query, emb, [Intervention(EMBEDDING, emb_sae, [], "add", 1.0, code=code)], k=5)
    assert len({i for i, _ in r.after} & {100, 101, 102}) >= 2


def test_optimised_code_lowers_a_decoders_loss_on_the_targets(linear):
    model, sae = linear
    targets = ["ABABABABAB", "BABABA"]
    code, losses = st.optimise_code(model, sae, HOOK, targets=targets, steps=40, lr=0.1, l1=1e-2)
    assert losses[-1] < losses[0] - 0.5 and 0 < int((code > 0).sum()) <= sae.cfg.k

    @torch.no_grad()
    def loss(ivs):
        return sum(
            float(st._steered_loss(model, st.prompt_tokens(model, t), *ivs))
            if ivs
            else float(model(st.prompt_tokens(model, t), return_type="loss"))
            for t in targets
        ) / len(targets)

    injected = Intervention(HOOK, sae, [], "add", 1.0, code=code)
    assert loss([injected]) < loss([]) - 0.5  # the sparse code (cut to k latents), decoded and injected
    text = st.continuation(model, st.generate(model, "AB", [injected], max_new_tokens=8), 3).replace(" ", "")
    assert sum(ch in "AB" for ch in text) >= 6
