"""Honest SAE metrics: reconstruction on held-out rows (a crosscoder's per source), a decoder's loss with the SAE
spliced in or an MLP replaced by a transcoder, and an encoder's sentence embedding with either."""

from __future__ import annotations

from itertools import islice
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

from saelab.config import TextConfig
from saelab.dictionaries import SAE, CrossCoder
from saelab.dictionaries.transcoder import splice_hooks
from saelab.errors import ConfigError
from saelab.models import device_of, forward_to, is_encoder
from saelab.text import SpecialTokens, iter_documents, pack_contexts

DENSE_THRESHOLD = 0.1
EXCLUSIVE_SHARE = 0.9
"""A crosscoder latent is exclusive to a source when that source holds at least this share of its decoder norm
(Minder et al.'s relative-norm cut of 0.1 / 0.9 for two sources)."""


class ReconstructionMetrics(TypedDict):
    """How well an SAE reconstructs held-out rows (`reconstruction_metrics`)."""

    fvu: float
    """Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2 over the whole set."""
    mse: float
    """Mean squared error per element."""
    l0: float
    """Mean number of active latents per row."""
    dead_frac: float
    """Fraction of latents dead by the training counters (no firing in the last `cfg.dead_tokens` tokens)."""
    dead_frac_eval: float
    """Fraction of latents that never fire on these rows."""
    dense_frac: float
    """Fraction of latents firing on more than 10% of these rows."""


class CrossCoderMetrics(ReconstructionMetrics):
    """A crosscoder's held-out metrics (`crosscoder_metrics`): `ReconstructionMetrics` over all its sources at once,
    then per source, in the order of `sources`."""

    sources: list[str]
    """Its sources, in order."""
    fvu_per_source: list[float]
    """Each source's FVU."""
    decoder_norm_share: list[float]
    """Each source's mean share of a latent's decoder norm (the shares of a latent sum to 1)."""
    exclusive_frac: list[float]
    """The fraction of latents exclusive to each source (it holds at least `EXCLUSIVE_SHARE` of their decoder
    norm)."""
    shared_frac: float
    """The fraction of latents exclusive to no source."""


class EmbeddingMetrics(TypedDict):
    """An encoder's sentence embeddings with a dictionary spliced in (`embedding_metrics`): an MLP replaced by a
    transcoder, or an activation by an SAE's reconstruction."""

    embedding_cos: float
    """Mean cosine between each context's mean-pooled last hidden state as it is and with the dictionary's output
    in place of the MLP's output (a transcoder) or of the activation it reconstructs (an SAE)."""
    embedding_cos_zero: float
    """The same with that output or activation zero-ablated: the baseline that `embedding_cos` should beat."""


class SplicedMetrics(TypedDict):
    """The model's loss with an SAE's reconstruction spliced in, or an MLP replaced by a transcoder
    (`spliced_metrics`)."""

    ce_orig: float
    """Next-token cross-entropy of the model as it is."""
    ce_sae: float
    """Cross-entropy with the SAE's reconstruction in place of the activation (a transcoder's output in place of the
    MLP's)."""
    ce_zero: float
    """Cross-entropy with the activation (a transcoder's: the MLP's output) zero-ablated."""
    ce_loss_score: float
    """CE loss recovered: (CE_zero - CE_sae) / (CE_zero - CE_orig)."""
    kl_sae: float
    """KL from the original next-token distribution to the spliced one."""
    kl_zero: float
    """KL from the original next-token distribution to the zero-ablated one."""
    kl_div_score: float
    """(KL_zero - KL_sae) / KL_zero."""


@torch.no_grad()
def reconstruction_metrics(sae: SAE, x: Tensor, batch_size: int = 8192) -> ReconstructionMetrics:
    """FVU, MSE, L0, and dead/dense fractions of `sae` on rows `x` [n, d_in] (raw activations).

    FVU is 1 - explained variance over the whole set: sum |x - x_hat|^2 / sum |x - mean(x)|^2.
    `dead_frac` uses the training counters (no firing in the last `cfg.dead_tokens` tokens);
    `dead_frac_eval` counts latents that never fire on these rows; `dense_frac` those firing on
    more than 10% of them.
    """
    device = sae.W_enc.device
    sse = 0.0
    l0 = 0.0
    fires = torch.zeros(sae.cfg.d_sae, device=device)
    mean = x.double().mean(0).to(device)
    total_var = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device, torch.float32)
        f = sae.encode(xb)
        recon = sae.decode(f)
        active = f != 0
        sse += float((xb - recon).double().pow(2).sum())
        total_var += float((xb.double() - mean).pow(2).sum())
        l0 += float(active.sum())
        fires += active.sum(0)
    n = len(x)
    density = fires / n
    return {
        "fvu": sse / total_var,
        "mse": sse / (n * x.shape[1]),
        "l0": l0 / n,
        "dead_frac": float(sae.dead_mask().float().mean()),
        "dead_frac_eval": float((fires == 0).float().mean()),
        "dense_frac": float((density > DENSE_THRESHOLD).float().mean()),
    }


@torch.no_grad()
def crosscoder_metrics(cc: CrossCoder, x: Tensor, batch_size: int = 8192) -> CrossCoderMetrics:
    """`ReconstructionMetrics` of crosscoder `cc` on raw rows `x` `[n, S, d_in]` over all sources together (the FVU
    of all of them: summed squared error over summed spread), each source's FVU, and the summary of its decoder
    norms that model diffing reads (`CrossCoderMetrics`)."""
    device = cc.W_enc.device
    n, n_sources = len(x), cc.cfg.n_sources
    sse = torch.zeros(n_sources, dtype=torch.float64, device=device)
    fires = torch.zeros(cc.cfg.d_sae, device=device)
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size].to(device, torch.float32)
        f = cc.encode(xb)
        sse += (xb - cc.decode(f)).double().square().sum((0, 2))
        fires += (f != 0).sum(0)
    spread = (x.double() - x.double().mean(0)).square().sum((0, 2)).to(device)
    share = cc.decoder_norms() / cc.decoder_norms().sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    exclusive = share >= EXCLUSIVE_SHARE
    return {
        "fvu": float(sse.sum() / spread.sum()),
        "mse": float(sse.sum()) / x.numel(),
        "l0": float(fires.sum()) / n,
        "dead_frac": float(cc.dead_mask().float().mean()),
        "dead_frac_eval": float((fires == 0).float().mean()),
        "dense_frac": float((fires / n > DENSE_THRESHOLD).float().mean()),
        "sources": list(cc.cfg.sources),
        "fvu_per_source": (sse / spread).tolist(),
        "decoder_norm_share": share.mean(0).tolist(),
        "exclusive_frac": exclusive.float().mean(0).tolist(),
        "shared_frac": float((~exclusive.any(1)).float().mean()),
    }


@torch.no_grad()
def embedding_metrics(
    model: Any, dictionary: SAE, *, input_hook: str, output_hook: str, tokens: Tensor
) -> EmbeddingMetrics:
    """The cosine between an encoder's sentence embeddings of `tokens` `[contexts, positions]` (the last layer's
    output mean-pooled over the positions, as sentence-transformers pools MiniLM's; the contexts are packed, without
    padding) as it is and with `dictionary` spliced in, and the same with the activation at `output_hook`
    zero-ablated. A transcoder (`input_hook` is `blocks.L.hook_mlp_in`, `output_hook` `blocks.L.hook_mlp_out`)
    replaces the MLP (`splice_hooks`); an SAE (`input_hook == output_hook`, its hook point) replaces the activation
    there by its reconstruction, as `spliced_metrics` does on a decoder."""
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def pooled(hooks: list[Any]) -> Tensor:
        with model.hooks(fwd_hooks=hooks):
            return forward_to(model, tokens, last).float().mean(1)

    orig = pooled([])
    if input_hook == output_hook:
        splice = [(output_hook, _splice(dictionary))]
    else:
        splice = splice_hooks(dictionary, model, input_hook=input_hook, output_hook=output_hook)
    spliced = pooled(splice)
    zero = pooled([(output_hook, _splice(None))])
    cos = torch.nn.functional.cosine_similarity
    return {
        "embedding_cos": float(cos(orig, spliced, dim=-1).mean()),
        "embedding_cos_zero": float(cos(orig, zero, dim=-1).mean()),
    }


def eval_tokens(store_config: dict[str, Any], model: Any, n_contexts: int) -> Tensor:
    """The first `n_contexts` contexts of the store's text source, packed as the harvest packed them."""
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    docs = iter_documents(TextConfig(**store_config["text"]))
    packed = pack_contexts(docs, model.tokenizer, special, context_length=store_config["context_length"])
    contexts = [t for t, _ in islice(packed, n_contexts)]
    return torch.from_numpy(np.stack(contexts)).to(device_of(model))


def _splice(sae: SAE | None) -> Any:
    """A hook that replaces the activation by the SAE's reconstruction (None: by zeros)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        if sae is None:
            return torch.zeros_like(act)
        flat = act.flatten(2) if act.ndim == 4 else act
        return sae(flat.float()).to(act.dtype).reshape(act.shape)

    return hook


@torch.no_grad()
def spliced_metrics(
    model: Any, sae: SAE, hook: str, *, tokens: Tensor, output_hook: str | None = None
) -> SplicedMetrics:
    """CE loss recovered and KL with the SAE's reconstruction spliced in at `hook` (SAEBench's core), or with an MLP
    replaced by a transcoder.

    An SAE (`output_hook` None) replaces the activation at `hook` by its reconstruction; a transcoder (`hook` its
    MLP's input `blocks.L.hook_mlp_in`, `output_hook` the MLP's output `blocks.L.hook_mlp_out`) replaces the MLP's
    output by its output of the MLP's input in the same forward pass (`splice_hooks`), and the zero baseline
    zero-ablates the MLP's output. `ce_loss_score` = (CE_zero - CE_sae) / (CE_zero - CE_orig), with zero-ablation as
    the baseline; `kl_div_score` = (KL_zero - KL_sae) / KL_zero, KL from the original next-token distribution.
    Meant for decoders: an encoder's MLM head (MiniLM's is untrained) gives no meaningful loss.
    """
    if sae.cfg.d_out is not None and output_hook is None:
        raise ConfigError(
            f"spliced_metrics got a transcoder (of {sae.cfg.hook_name} -> {sae.cfg.hook_name_out}); give output_hook, "
            "the model's hook point of the MLP's output it replaces (blocks.L.hook_mlp_out)"
        )
    if sae.cfg.d_out is None and output_hook is not None:
        raise ConfigError("spliced_metrics got an SAE, which writes the hook point it reads; give no output_hook")

    def run(hooks: list[Any]) -> tuple[Tensor, Tensor]:
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits").float()
        logp = logits[:, :-1].log_softmax(-1)
        ce = -logp.gather(-1, tokens[:, 1:, None]).mean()
        return ce, logp

    if output_hook is None:
        splice, written = [(hook, _splice(sae))], hook
    else:
        splice, written = splice_hooks(sae, model, input_hook=hook, output_hook=output_hook), output_hook
    ce_orig, logp_orig = run([])
    ce_sae, logp_sae = run(splice)
    ce_zero, logp_zero = run([(written, _splice(None))])

    def kl(logp: Tensor) -> float:
        return float((logp_orig.exp() * (logp_orig - logp)).sum(-1).mean())

    kl_sae, kl_zero = kl(logp_sae), kl(logp_zero)
    return {
        "ce_orig": float(ce_orig),
        "ce_sae": float(ce_sae),
        "ce_zero": float(ce_zero),
        "ce_loss_score": float((ce_zero - ce_sae) / (ce_zero - ce_orig)),
        "kl_sae": kl_sae,
        "kl_zero": kl_zero,
        "kl_div_score": (kl_zero - kl_sae) / kl_zero,
    }
