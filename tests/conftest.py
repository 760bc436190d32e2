"""Shared fixtures: the real MiniLM encoder, and a small decoder with an offline BPE tokenizer."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from saelab.models import load_model, save_model
from saelab.text import embedded_documents

torch.set_num_threads(2)


def train_bpe_tokenizer(folder, vocab_size: int = 512, n_docs: int = 600):
    """A byte-level BPE tokenizer trained on the embedded corpus, with GPT-2 style <|endoftext|>.

    It is saved to `folder` and loaded back, as TransformerLens reloads tokenizers by their path.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(islice(embedded_documents(), n_docs), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def decoder_config(d_vocab: int, n_layers: int = 2) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=n_layers, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=64, d_vocab=d_vocab,
        act_fn="gelu", normalization_type="LN", seed=0, model_name="tiny-decoder",
    )


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def decoder(bpe_tokenizer):
    return load_model(decoder_config(len(bpe_tokenizer)), device="cpu", tokenizer=bpe_tokenizer)


@pytest.fixture(scope="session")
def decoder_dir(decoder, tmp_path_factory):
    return str(save_model(decoder, tmp_path_factory.mktemp("models") / "tiny-decoder"))


@pytest.fixture(scope="session")
def minilm():
    return load_model("minilm", device="cpu")
