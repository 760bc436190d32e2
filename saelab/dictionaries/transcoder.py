"""Transcoders (Dunefsky et al. 2024) and skip transcoders (Paulo et al. 2025): an SAE class of any activation
(`topk`, `batchtopk`, `jumprelu`, `relu`, Matryoshka prefixes) with `SAEConfig.d_out` set reads an MLP's input and
writes its output; `SAEConfig.skip` adds a linear skip `W_skip [d_out, d_in]`. What this module adds to the SAE
classes: their SAELens names, which hook pairs are one MLP's input and output, the row-aligned rows a training step
reads, the held-out metrics and the splice that replaces an MLP by a transcoder in a TransformerLens model.

References followed:

- Inference and checkpoints follow SAELens's `Transcoder` / `SkipTranscoder` (`sae_lens/saes/transcoder.py`):
  `f = act(x @ W_enc + b_enc)` with nothing subtracted from the input (`apply_b_dec_to_input: false`, which SAELens
  requires), `out = f @ W_dec + b_dec` with `W_dec [d_sae, d_out]`, `b_dec [d_out]`, and the skip `x @ W_skip.T` added
  by `forward` (not `decode`), `W_skip` stored `[d_out, d_in]` as SAELens stores it. ReLU transcoders are saved as
  SAELens's `transcoder` / `skip_transcoder`, JumpReLU and BatchTopK ones (BatchTopK's inference threshold per latent)
  as `jumprelu_transcoder` / `jumprelu_skip_transcoder`, so SAELens loads them with identical outputs. SAELens has no
  TopK transcoder: TopK ones are saved as `topk_transcoder` / `topk_skip_transcoder`, names SAELens refuses rather
  than encode them with another activation.
- Training follows sparsify's `SparseCoder(transcode=True, skip_connection=...)` (`sparsify/sparse_coder.py`,
  `sparsify/trainer.py`): the loss is the FVU of the output (squared error over the output batch's total variance),
  AuxK's dead latents reconstruct the output residual with `k_aux = d_out // 2`, `W_skip` starts at zero, and `b_enc`
  starts centring the pre-activations on the inputs (sparsify uses the mean; saelab the geometric median, as it sets an
  SAE's `b_dec`) with `b_dec` at the outputs' centre. Unlike sparsify (whose transcoder decoder starts at zero and is
  never normalised) saelab keeps decoder rows at unit norm and scales input and output to mean norm `sqrt(d)` during
  training, as for its SAEs, so the codes are the weights of unit output directions; both scales are folded into the
  saved weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saelab.dictionaries.base import SAE
from saelab.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from saelab.models import Model
    from saelab.train.metrics import ReconstructionMetrics

SAELENS_TRANSCODER_ARCH = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
    ("batchtopk", False): "jumprelu_transcoder",
    ("batchtopk", True): "jumprelu_skip_transcoder",
    ("topk", False): "topk_transcoder",
    ("topk", True): "topk_skip_transcoder",
}
"""(saelab arch, skip) -> the `architecture` a transcoder's `cfg.json` records (the TopK names are saelab's own)."""
FROM_SAELENS_TRANSCODER = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
"""SAELens transcoder architecture -> (saelab arch, skip) that reads it."""

MLP_INPUT = "hook_mlp_in"
MLP_OUTPUT = "hook_mlp_out"
_MLP_HOOK = re.compile(r"^(?:(?P<alias>[^/]+)/)?blocks\.(?P<layer>\d+)\.(?P<kind>hook_mlp_in|hook_mlp_out)$")


def saelens_transcoder_arch(arch: str, skip: bool) -> str:
    """The `cfg.json` `architecture` of a transcoder of `arch` (with a skip when `skip`)."""
    return SAELENS_TRANSCODER_ARCH[arch, skip]


def mlp_layer(input_hook: str, output_hook: str) -> int:
    """The layer `L` whose MLP reads `input_hook` and writes `output_hook`, which must be `blocks.L.hook_mlp_in` and
    `blocks.L.hook_mlp_out` (both with the same `<model alias>/` prefix, or none); `ConfigError` naming the pair to give
    otherwise."""
    got = _MLP_HOOK.match(input_hook), _MLP_HOOK.match(output_hook)
    inp, out = got
    if inp and out and inp["kind"] == MLP_INPUT and out["kind"] == MLP_OUTPUT:
        if inp["layer"] == out["layer"] and inp["alias"] == out["alias"]:
            return int(inp["layer"])
    match = next((m for m in got if m), None)
    prefix = f"{match['alias']}/" if match and match["alias"] else ""
    layer = match["layer"] if match else "L"
    raise ConfigError(
        f"a transcoder replaces one MLP, so it reads that MLP's input and writes its output, but {input_hook!r} -> "
        f"{output_hook!r} is not such a pair; give input {prefix}blocks.{layer}.{MLP_INPUT} and output "
        f"{prefix}blocks.{layer}.{MLP_OUTPUT} (harvest both), or train an SAE on each hook instead"
    )


def aligned_rows(batch: Mapping[str, Tensor], hooks: Sequence[str]) -> list[Tensor]:
    """The rows of each of `hooks` in one store batch (`ActivationStore.batches` of several hooks, whose row `i` is the
    same token in every hook), in the order given: a transcoder's `[input, output]`, a crosscoder's sources.
    `StoreError` if a hook is missing or the row counts differ."""
    missing = [h for h in hooks if h not in batch]
    if missing:
        raise StoreError(f"hook points {missing} are not in the batch, which has {sorted(batch)}; harvest them")
    rows = [batch[h] for h in hooks]
    if len({len(r) for r in rows}) > 1:
        counts = {h: len(r) for h, r in zip(hooks, rows, strict=True)}
        raise StoreError(f"hook points with different row counts cannot be paired: {counts}; read them from one store")
    return rows


@torch.no_grad()
def transcoder_metrics(transcoder: SAE, x: Tensor, y: Tensor, batch_size: int = 8192) -> ReconstructionMetrics:
    """Held-out metrics of a transcoder (an `SAE` with `cfg.d_out`) on row-aligned inputs `x`
    `[n, d_in]` and outputs `y` `[n, d_out]` (raw activations): the keys of `saelab.train.metrics.ReconstructionMetrics`,
    with `fvu` and `mse` those of its output (the skip included) against `y`."""
    from saelab.train.metrics import DENSE_THRESHOLD  # training builds on the dictionaries

    device = transcoder.W_enc.device
    sse = torch.zeros((), dtype=torch.float64, device=device)
    fires = torch.zeros(transcoder.cfg.d_sae, device=device)
    for start in range(0, len(x), batch_size):
        xb, yb = (t[start : start + batch_size].to(device, torch.float32) for t in (x, y))
        sse += (yb - transcoder(xb)).double().square().sum()
        fires += (transcoder.encode(xb) != 0).sum(0)
    total_var = float((y.double() - y.double().mean(0)).square().sum())
    return {
        "fvu": float(sse) / total_var,
        "mse": float(sse) / y.numel(),
        "l0": float(fires.sum()) / len(x),
        "dead_frac": float(transcoder.dead_mask().float().mean()),
        "dead_frac_eval": float((fires == 0).float().mean()),
        "dense_frac": float((fires / len(x) > DENSE_THRESHOLD).float().mean()),
    }


def splice_hooks(
    transcoder: SAE, model: Model, *, input_hook: str, output_hook: str
) -> list[tuple[str, Callable[..., Any]]]:
    """TransformerLens forward hooks that replace an MLP of `model` by `transcoder`: the MLP's input (saelab's
    `input_hook`, `blocks.L.hook_mlp_in`, read where the model holds it, as harvests read it: `saelab.models.locate`)
    is kept, and the activation at `output_hook` (`blocks.L.hook_mlp_out`) is replaced by the transcoder's output of
    it (`model.hooks(fwd_hooks=...)` or `run_with_hooks`)."""
    from saelab.models import locate  # here: it imports TransformerLens, which only splicing needs

    mlp_layer(input_hook, output_hook)
    point = locate(model, input_hook)
    kept: list[Tensor] = []

    def keep(act: Tensor, hook: Any) -> None:
        kept[:] = [point.value(act)]

    def replace(act: Tensor, hook: Any) -> Tensor:
        if not kept:
            raise RuntimeError(f"{input_hook} did not fire before {output_hook}")
        return transcoder(kept.pop().float()).to(act.dtype).reshape(act.shape)

    return [(point.hook, keep), (output_hook, replace)]
