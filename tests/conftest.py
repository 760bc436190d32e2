"""Shared fixtures: the real MiniLM encoder, and a small decoder with an offline BPE tokenizer."""

from __future__ import annotations

import copy
import os
from itertools import islice
from typing import Any

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from saelab.dictionaries import SAE, SAEConfig
from saelab.models import load_model, save_model
from saelab.text import embedded_documents
from saelab.toys.synthetic import decoder_config

# One thread per pytest worker: `make test` runs two workers on two cores, and two threads each on two busy cores wait on
# each other, many times slower on these small models (04_circuits' induction model: 755 s on two threads, 83 s on
# one). Subprocesses (the CLI, torchrun ranks, notebook kernels) inherit it through OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

# minutes in each file (notebook 06, about 3; the other notebooks, about 4): started first, one on each worker
LONGEST_FIRST = ("tests/test_notebook_transcoders.py", "tests/test_notebooks.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest files first, so that `pytest -n 2 --dist loadfile --no-loadscope-reorder` (`make test`; xdist's
    reorder would sort the files by their number of tests instead) ends both workers together."""
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # a stable sort: the rest keep their order


def train_bpe_tokenizer(folder, vocab_size: int = 512, n_docs: int = 600):
    """A byte-level BPE tokenizer trained on the embedded corpus, with GPT-2 style <|endoftext|>.

    It is saved to `folder` and loaded back, as TransformerLens reloads tokenizers by their path.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(islice(embedded_documents(), n_docs), trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    ).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


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
def relu_decoder(bpe_tokenizer):
    """A tiny ReLU decoder whose `ln2` weights and biases are not 1 and 0 (as at initialisation), so that a transcoder
    fed the normalised residual before them would be caught."""
    torch.manual_seed(0)
    model = load_model(decoder_config(len(bpe_tokenizer), act_fn="relu"), device="cpu", tokenizer=bpe_tokenizer)
    with torch.no_grad():
        for block in model.blocks:
            ln: Any = block.ln2
            ln.w.copy_(1 + 0.5 * torch.randn_like(ln.w))
            ln.b.copy_(0.5 * torch.randn_like(ln.b))
    return model


def exact_transcoder(model: Any, layer: int, *, skip: bool = False) -> SAE:
    """A ReLU transcoder that is layer `layer`'s MLP of a ReLU model exactly: its neurons are the latents (`W_enc`,
    `b_enc` the MLP's `W_in`, `b_in`; `W_dec`, `b_dec` its `W_out`, `b_out`), and with `skip` a zero `W_skip`."""
    d, mlp = model.cfg.d_model, model.blocks[layer].mlp
    cfg = SAEConfig(
        arch="relu",
        d_in=d,
        d_sae=model.cfg.d_mlp,
        d_out=d,
        skip=skip,
        hook_name=f"blocks.{layer}.hook_mlp_in",
        hook_name_out=f"blocks.{layer}.hook_mlp_out",
        dtype="float32",
    )
    torch.manual_seed(1)
    sae = SAE.from_config(cfg).eval()
    with torch.no_grad():
        for mine, its in ((sae.W_enc, mlp.W_in), (sae.b_enc, mlp.b_in), (sae.W_dec, mlp.W_out), (sae.b_dec, mlp.b_out)):
            mine.copy_(its)
    return sae


@pytest.fixture(scope="session")
def minilm():
    return load_model("minilm", device="cpu")


def train_decoder(model, steps: int = 80, context_length: int = 32, batch_size: int = 16, lr: float = 3e-3):
    """Train a decoder briefly on the embedded corpus (next-token loss), in place."""
    from saelab.models import is_encoder
    from saelab.text import SpecialTokens, embedded_documents, pack_contexts

    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    contexts = pack_contexts(embedded_documents(), model.tokenizer, special, context_length=context_length)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = torch.from_numpy(np.stack([t for t, _ in islice(contexts, batch_size)]))
        loss = model(batch, return_type="loss")
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


@pytest.fixture(scope="session")
def trained_decoder_dir(bpe_tokenizer, tmp_path_factory):
    """A tiny decoder trained for a few seconds, so that its loss means something."""
    model = load_model(decoder_config(len(bpe_tokenizer)), device="cpu", tokenizer=bpe_tokenizer)
    assert isinstance(model, HookedTransformer)  # a config builds a HookedTransformer, which save_model takes
    return str(save_model(train_decoder(model), tmp_path_factory.mktemp("models") / "trained-decoder"))


@pytest.fixture(scope="session")
def induction_run(tmp_path_factory):
    """A run with a known circuit (saelab.toys.induction_run): the two-layer induction model, its attn.hook_z
    activations, a TopK SAE per layer and their analysis (about 15 s)."""
    from saelab.toys import induction_run as make_run

    return make_run(tmp_path_factory.mktemp("induction") / "run", progress=False)


TWO_MODEL_HOOKS = ["blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"]


@pytest.fixture(scope="session")
def tuned_decoder_dir(decoder, tmp_path_factory):
    """The tiny decoder with layer 0's MLP drawn again (at the same scale): another model with the same tokenizer,
    whose `blocks.0.hook_mlp_in` is the tiny decoder's and whose `blocks.0.hook_mlp_out` is not."""
    tuned = copy.deepcopy(decoder)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tuned.blocks[0].mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.std())
    return str(save_model(tuned, tmp_path_factory.mktemp("models") / "tuned-decoder"))


@pytest.fixture(scope="session")
def two_model_run(decoder_dir, tuned_decoder_dir, tmp_path_factory):
    """A run over a store of two models (`base`: the tiny decoder, `tuned`: `tuned_decoder_dir`; 4,096 tokens at
    `TWO_MODEL_HOOKS`) and its dictionaries, trained in one pass: a TopK SAE on `tuned/blocks.0.hook_mlp_out`, a
    transcoder of the tuned model's layer-0 MLP and a crosscoder over that MLP's output in both models. The run's
    folder and the `TrainedSAE`s, in that order."""
    from saelab.toys.runs import small_models_store
    from saelab.train import TrainConfig, train

    run = tmp_path_factory.mktemp("two-models") / "run"
    store = small_models_store(run, {"base": decoder_dir, "tuned": tuned_decoder_dir}, TWO_MODEL_HOOKS)
    tuned_in, tuned_out = (f"tuned/{h}" for h in TWO_MODEL_HOOKS)
    cfg = {
        "store": store.path,
        "run": str(run),
        "hooks": [tuned_out],
        "transcoders": [{"input": tuned_in, "output": tuned_out}],
        "crosscoders": [{"sources": [f"base/{TWO_MODEL_HOOKS[1]}", tuned_out], "arch": "topk"}],
        "tokens": 512 * 40,
        "batch_size": 512,
        "eval_rows": 1024,
        "warmup_steps": 5,
        "ce_contexts": 4,
        "grid": {"arch": ["topk"], "k": [8], "expansion": [2], "lr": [3e-3]},
        "device": "cpu",
    }
    return run, train(TrainConfig.model_validate(cfg), progress=False)


@pytest.fixture(scope="session")
def two_model_analysed(two_model_run):
    """`two_model_run` with every dictionary analysed (`saelab.analysis.analyze`): the run, its `TrainedSAE`s and
    the analyses' paths, in the same order."""
    from saelab.analysis import AnalysisConfig, analyze

    run, results = two_model_run
    return run, results, analyze(str(run), AnalysisConfig(device="cpu", n_top=8, window=3), progress=False)


@pytest.fixture(scope="session")
def ioi_dir(tmp_path_factory):
    """The folder of the IOI toy (saelab.toys.ioi), trained to 0.95 IO accuracy (about 15 s)."""
    from saelab.toys.ioi import train_ioi_model

    folder = tmp_path_factory.mktemp("ioi") / "model"
    train_ioi_model(folder, progress=False)
    return folder


@pytest.fixture(scope="session")
def ioi_model(ioi_dir):
    """The IOI toy, loaded from `ioi_dir`."""
    from saelab.models import load_model

    return load_model(str(ioi_dir), device="cpu")
