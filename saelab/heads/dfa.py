"""Direct feature attribution (Kissane et al. 2024, "Interpreting Attention Layer Outputs with Sparse Autoencoders")
of the latents of a dictionary on `blocks.L.attn.hook_z` to that layer's heads and to the source positions they
attend to.

`hook_z` is the heads' outputs concatenated head-major (`[n_heads * d_head]`), and a dictionary's encoder is affine in
it: `pre = z @ W + b` (for saelab's SAEs `W = s W_enc` and `b = b_enc - b_dec @ W_enc`, with whitening folded in too;
it is read off the dictionary itself, `pre_acts(prepare_input(.))` at zero and at the unit vectors, so every
architecture's own encoder is used). So a latent's pre-activation is `b` plus one term per head, `z_h . W[h-block]`,
and since `z_h[dest] = sum_src pattern[h, dest, src] v_h[src]` each head's term splits further over the source
positions: `pattern[h, dest, src] (v_h[src] . W[h-block])`. Both sums are exact (`tests/heads/test_dfa.py`). This
follows SAEDashboard's `DFACalculator` (`calculate_standard_intermediate_tensor`: `pattern * v` times the encoder's
columns, grouped-query models with their key/value heads repeated over the query heads), keeping the heads apart
and folding the dictionary's input preprocessing into `W` and `b`. The model runs once, up to the layer's `hook_z`,
with hooks on its `hook_v`, `hook_pattern` and `hook_z`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from saelab.dictionaries import SAE
from saelab.errors import HeadsError
from saelab.models import device_of

HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_z")


@dataclass
class Attribution:
    """Direct feature attribution of some latents of a dictionary on `attn.hook_z` (`direct_feature_attribution`).

    The pre-activation of latent `latents[i]` at `[b, dest]` is exactly `bias[i] + per_head[b, dest, :, i].sum()`,
    and `per_head[b, dest, h, i] = per_source[b, dest, :, h, i].sum()`."""

    hook: str
    """The dictionary's hook point, `blocks.L.attn.hook_z`."""
    latents: Tensor
    """The latents attributed `[n]` (indices into the dictionary)."""
    tokens: Tensor
    """The input `[batch, pos]`."""
    pre_acts: Tensor
    """The latents' pre-activations `[batch, pos, n]`, as the dictionary's encoder computes them."""
    acts: Tensor
    """The latents' activations `[batch, pos, n]` (the dictionary's `encode`)."""
    bias: Tensor
    """`[n]`: each latent's pre-activation at `z = 0` (the part no head contributes)."""
    per_head: Tensor
    """`[batch, pos, n_heads, n]`: each head's term `z_h . W[h-block]`."""
    per_source: Tensor
    """`[batch, dest, src, n_heads, n]`: each head's term split over the source positions it attends to,
    `pattern[h, dest, src] (v_h[src] . W[h-block])`."""

    @property
    def layer(self) -> int:
        """The attention layer `L` of `hook`."""
        return attention_layer(self.hook)

    def by_source(self) -> Tensor:
        """`[batch, dest, src, n]`: each source position's term, summed over the heads."""
        return self.per_source.sum(3)


def attention_layer(hook: str) -> int:
    """The layer of `blocks.L.attn.hook_z`; any other hook is refused (`HeadsError`) with the fix."""
    match = HOOK_Z.fullmatch(hook)
    if match is None:
        raise HeadsError(
            f"direct feature attribution reads attention heads, so it needs a dictionary on `blocks.L.attn.hook_z` "
            f"(the heads' outputs, flattened heads x d_head), not on {hook!r}; train one on `blocks.L.attn.hook_z` "
            f"(harvest that hook point), or pass `hook=` when the dictionary's `cfg.hook_name` is not set"
        )
    return int(match.group(1))


def encoder_map(sae: SAE) -> tuple[Tensor, Tensor]:
    """The dictionary's encoder as an affine map of raw activations, `pre = x @ W + b`: `W [d_in, d_sae]`, `b
    [d_sae]` (input scale, whitening and the subtracted `b_dec` folded in)."""
    if sae.signed_codes:
        raise HeadsError(
            f"{type(sae).__name__} codes come from a pursuit, not from one affine encoder, so they do not split over "
            "heads; use an SAE of another architecture (TopK, BatchTopK, JumpReLU, ReLU)"
        )
    probe = torch.cat([torch.zeros(1, sae.cfg.d_in), torch.eye(sae.cfg.d_in)]).to(sae.W_enc)
    with torch.no_grad():
        pre = sae.pre_acts(sae.prepare_input(probe))
    return pre[1:] - pre[:1], pre[0]


class _Stop(Exception):
    """Raised in the layer's `hook_z` hook: nothing after it is needed."""


def _attention(model: HookedTransformer, tokens: Tensor, layer: int) -> dict[str, Tensor]:
    """`hook_v` `[batch, src, n_kv_heads, d_head]`, `hook_pattern` `[batch, n_heads, dest, src]` and `hook_z`
    `[batch, dest, n_heads, d_head]` of `layer`, from one forward pass stopped at `hook_z`."""
    names = [f"blocks.{layer}.attn.hook_{kind}" for kind in ("v", "pattern", "z")]
    out: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        out[hook.name.rsplit("_", 1)[1]] = act.detach()
        if hook.name == names[-1]:
            raise _Stop

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, keep) for name in names]):
        try:
            model(tokens, return_type=None)
        except _Stop:
            pass
    if len(out) != len(names):
        raise HeadsError(f"the forward pass did not reach {names}: is layer {layer} an attention layer of the model?")
    return out


@dataclass
class ExampleAttribution:
    """Direct feature attribution of one latent at one destination position of each of `m` examples
    (`attribution_at`): the numbers of `Attribution` that a feature page shows."""

    per_head: Tensor
    """`[m, n_heads]`: each head's term in the latent's pre-activation at the example's position
    (`Attribution.per_head[b, dest, :, latent]`)."""
    by_source: Tensor
    """`[m, pos]`: each source position's term, summed over the heads (`Attribution.by_source()[b, dest, :, latent]`)."""


EXAMPLES_PER_STEP = 256
"""Examples `attribution_at` gathers values for at a time (bounds its memory at `EXAMPLES_PER_STEP x pos x n_heads x
d_head` numbers)."""


def attribution_at(
    model: HookedTransformer,
    sae: SAE,
    tokens: Tensor,
    *,
    rows: Tensor,
    dests: Tensor,
    latents: Tensor,
    hook: str | None = None,
    encoder: tuple[Tensor, Tensor] | None = None,
) -> ExampleAttribution:
    """`direct_feature_attribution` of latent `latents[i]` at position `dests[i]` of input row `rows[i]` of `tokens`
    `[batch, pos]` only, for each example `i` (`ExampleAttribution`): one forward pass for all of them, and
    `m x pos x n_heads` numbers instead of `batch x pos^2 x n_heads x n` (the feature pass's top examples).
    `encoder` is the dictionary's `encoder_map`, where the caller has it (computed here otherwise)."""
    hook = hook or sae.cfg.hook_name
    layer = _check_input(model, sae, hook)
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    cache = _attention(model, tokens.to(device_of(model)), layer)
    W_all, _ = encoder if encoder is not None else encoder_map(sae)
    v_all = cache["v"].repeat_interleave(n_heads // cache["v"].shape[2], dim=2).to(W_all)  # grouped-query: shared kv
    pattern_all, z_all = cache["pattern"].to(W_all), cache["z"].to(W_all)
    per_head, by_source = [], []
    for step in range(0, len(latents), EXAMPLES_PER_STEP):
        pick = slice(step, step + EXAMPLES_PER_STEP)
        W = W_all[:, latents[pick].to(W_all.device)].reshape(n_heads, d_head, -1)  # [h, d, m]: each example's column
        b, q = rows[pick].to(W.device), dests[pick].to(W.device)
        with torch.no_grad():
            value_terms = torch.einsum("mshd,hdm->msh", v_all[b], W)  # v_h[src] . W[h-block]
            by_source.append(torch.einsum("mhs,msh->ms", pattern_all[b, :, q], value_terms).cpu())
            per_head.append(torch.einsum("mhd,hdm->mh", z_all[b, q], W).cpu())
    return ExampleAttribution(
        per_head=torch.cat(per_head) if per_head else torch.zeros(0, n_heads),
        by_source=torch.cat(by_source) if by_source else torch.zeros(0, tokens.shape[1]),
    )


def _check_input(model: HookedTransformer, sae: SAE, hook: str) -> int:
    """The attention layer `sae` reads at `hook` (`attention_layer`); `HeadsError` when its input is not that
    layer's `hook_z` of `model`."""
    layer = attention_layer(hook)
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    if sae.cfg.d_in != n_heads * d_head:
        raise HeadsError(
            f"the dictionary reads {sae.cfg.d_in} numbers, but {hook} holds n_heads x d_head = {n_heads} x {d_head}; "
            "is it this model's dictionary?"
        )
    return layer


def direct_feature_attribution(
    model: HookedTransformer,
    sae: SAE,
    tokens: Tensor,
    *,
    latents: list[int] | Tensor | None = None,
    hook: str | None = None,
) -> Attribution:
    """Each of `latents`' (all the dictionary's when `None`) pre-activation on `tokens` `[batch, pos]` split into its
    heads' terms and each head's term into its source positions (`Attribution`; the module docstring gives the
    algebra). `sae` reads `hook` (its `cfg.hook_name` when `None`), which must be `blocks.L.attn.hook_z`. The
    per-source tensor holds `batch x pos^2 x n_heads x len(latents)` numbers: pick the latents for long inputs."""
    hook = hook or sae.cfg.hook_name
    layer = _check_input(model, sae, hook)
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    index = torch.arange(sae.cfg.d_sae) if latents is None else torch.as_tensor(latents, dtype=torch.long).flatten()
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < sae.cfg.d_sae):
        raise HeadsError(f"latents must lie in [0, {sae.cfg.d_sae}), got {index.tolist()}")
    tokens = tokens.to(device_of(model))
    cache = _attention(model, tokens, layer)
    W, b = encoder_map(sae)
    columns = index.to(W.device)
    W = W[:, columns].reshape(n_heads, d_head, -1)  # the head blocks of the encoder's rows
    v = cache["v"].repeat_interleave(n_heads // cache["v"].shape[2], dim=2).to(W)  # grouped-query: shared kv heads
    z = cache["z"].to(W)
    with torch.no_grad():
        value_terms = torch.einsum("bshd,hdn->bshn", v, W)  # v_h[src] . W[h-block]
        per_source = torch.einsum("bhqs,bshn->bqshn", cache["pattern"].to(W), value_terms)
        pre = sae.pre_acts(sae.prepare_input(z.flatten(2)))[:, columns].view(*tokens.shape, -1)
        acts = sae.encode(z.flatten(2))[..., columns]
        per_head = torch.einsum("bqhd,hdn->bqhn", z, W)
    return Attribution(
        hook=hook,
        latents=index,
        tokens=tokens.cpu(),
        pre_acts=pre.cpu(),
        acts=acts.cpu(),
        bias=b[columns].cpu(),
        per_head=per_head.cpu(),
        per_source=per_source.cpu(),
    )
