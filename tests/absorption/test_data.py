"""The probe step (saelab.absorption.data) on an encoder: the word read in the bare template, split 80/20 by token."""

from __future__ import annotations

import torch

from saelab.absorption import FIRST_LETTER_TEMPLATE, AbsorptionSettings, PromptStyle, probe_data
from saelab.models import capture, resolve_hooks

FAST = AbsorptionSettings(probe_batch_size=1024)  # the metric's known answers do not depend on the probe's batch


def test_encoder_reads_the_word_in_the_bare_template(minilm):
    style = PromptStyle.for_model(minilm)
    assert style == PromptStyle(FIRST_LETTER_TEMPLATE, 0)
    data = probe_data(minilm, "blocks.0.hook_resid_post", max_words=200, s=FAST)
    assert data.absorb_x is data.test_x  # no generation and no fresh examples: one prompt per word
    tok = minilm.tokenizer
    word = data.test_words[0]
    toks = tok(FIRST_LETTER_TEMPLATE.format(word=word))["input_ids"]  # [CLS] word has the first letter : [SEP]
    assert toks[1] == data.test_tokens[0] and len(toks) == 8
    ref = capture(minilm, torch.tensor([toks]), resolve_hooks(minilm, ["blocks.0.hook_resid_post"]))
    assert torch.allclose(data.test_x[0], ref["blocks.0.hook_resid_post"][0, 1], atol=1e-4)
    assert len(data.train_y) + len(data.test_y) == 200 and len(data.test_y) == 40  # 80/20 by token
