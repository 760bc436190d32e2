"""Dictionary panels: residual directions through `W_O`, logit effects for decoders and encoders."""

import numpy as np
import torch

from saelab.analysis import logit_effects, residual_directions
from tests.analysis.helpers import make_sae


def test_logit_effects_decoder_and_encoder(decoder, minilm, store):
    sae = make_sae("topk", d_in=64)
    dirs = residual_directions(decoder, sae, "blocks.0.attn.hook_z")
    W_O = decoder.blocks[0].attn.W_O.detach()
    assert torch.allclose(dirs[3], torch.einsum("hd,hdm->m", sae.W_dec[3].detach().view(4, 16), W_O), atol=1e-5)
    kind, top_ids, top_vals, bot_ids, _ = logit_effects(decoder, dirs, 4)
    want = ((dirs - dirs.mean(1, keepdim=True)) * decoder.ln_final.w.detach()) @ decoder.W_U.detach()
    assert kind == "unembedding" and top_ids.tolist() == want.topk(4, dim=1).indices.tolist()
    assert bot_ids.tolist() == want.topk(4, dim=1, largest=False).indices.tolist()
    # encoders: nearest token embeddings; a token's own embedding is its own nearest token
    W_E = minilm.W_E.detach()
    kind, top_ids, top_vals, _, _ = logit_effects(minilm, W_E[[2000, 3000]].clone(), 3)
    assert kind == "embedding_cosine" and top_ids[:, 0].tolist() == [2000, 3000]
    np.testing.assert_allclose(top_vals[:, 0], 1, rtol=1e-5)
