"""Fixtures of the steering tests (built once for the package): an SAE on the tiny decoder, a one-layer model whose
steered logits are computable by hand, and MiniLM embeddings of 200 documents with an SAE trained on them."""

from __future__ import annotations

import itertools

import pytest

from saelab import steering as st
from saelab.circuits import ALPHABET
from saelab.steering import EMBEDDING
from saelab.text import embedded_documents
from saelab.toys.induction import char_decoder
from tests.steering.helpers import HOOK, fitted_sae


@pytest.fixture(scope="package")
def dec_sae(decoder):
    tokens = st.prompt_tokens(decoder, " ".join(itertools.islice(embedded_documents(), 3))[:600])[:, :64]
    return fitted_sae(st.hook_acts(decoder, tokens, HOOK)[0], 256, 8)


@pytest.fixture(scope="package")
def linear(tmp_path_factory):
    """One attention-only layer without LayerNorm: logits = resid_post @ W_U + b_U, so an edit of the last residual
    stream changes the logits by exactly edit @ W_U at the positions edited, and nowhere else."""
    shape = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_head": 16, "positional_embedding_type": "standard"}
    model = char_decoder(tmp_path_factory.mktemp("chars"), n_ctx=48, seed=1, model_name="custom", **shape).eval()
    acts = st.hook_acts(model, st.prompt_tokens(model, ALPHABET[:40]), HOOK)[0]
    return model, fitted_sae(acts, 64, 4)


@pytest.fixture(scope="package")
def corpus(minilm):
    docs = list(itertools.islice(embedded_documents(), 200))
    return docs, st.embed(minilm, docs, max_length=48)


@pytest.fixture(scope="package")
def emb_sae(corpus):
    """A TopK SAE trained on the corpus's MiniLM sentence embeddings (as in O'Neill et al.)."""
    return fitted_sae(corpus[1], 192, 8, steps=150, hook=EMBEDDING)
