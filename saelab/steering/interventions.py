"""`Intervention`: one edit of a hook point along SAE latents (the modes in the package docstring), its checks
against a model, and `steer`, the context in which a model runs with interventions applied."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor

from saelab.dictionaries import SAE
from saelab.errors import SteeringError
from saelab.models import Model, flatten_heads, is_encoder, resolve_hooks

Mode = Literal["add", "clamp", "orthogonal", "cap", "ablate"]
Scope = Union[Literal["prompt", "generated", "all"], list[int]]
MODES: tuple[str, ...] = ("add", "clamp", "orthogonal", "cap", "ablate")
EMBEDDING = "embedding"  # the hook name of an encoder's pooled sentence embedding (for SAEs trained on embeddings)

MAX_COEFFICIENT = 1e4
"""The largest |coefficient| an `Intervention` takes, in units of its `scale` (the latent's typical max activation):
ten thousand times the latent's strongest usual firing. Such an edit outweighs the latent's own contribution ten
thousand times over, and a LayerNorm downstream divides the activations' size away, so larger coefficients change
no output; they only push float32 toward overflow (1e30 turned every cosine into NaN, and 1e39 is inf in float32)."""
MAX_VALUE = 1e15
"""The largest |coefficient x scale| (activation units) an `Intervention` takes: a LayerNorm squares and sums the d
entries of the edited activations, which stays finite in float32 (largest 3.4e38) while value^2 * d does, i.e. for
any width d up to 1e8 at 1e15. It binds only where `scale` itself is huge."""


def check_coefficient(coefficient: float, scale: float = 1.0) -> None:
    """Refuse a steering coefficient outside the range every `Intervention` takes (`MAX_COEFFICIENT` and
    `MAX_VALUE`), with a `SteeringError` naming the value and the limit. Also for callers (a sweep, a form) that
    check coefficients before building interventions from them."""
    units = "in units of the latent's typical max activation"
    if not math.isfinite(coefficient):
        raise SteeringError(
            f"coefficient {coefficient} is not a finite number; give one with |coefficient| <= {MAX_COEFFICIENT:g} "
            f"({units})"
        )
    if abs(coefficient) > MAX_COEFFICIENT:
        raise SteeringError(
            f"coefficient {coefficient:g} is past the steering limit |coefficient| <= {MAX_COEFFICIENT:g} ({units}; "
            "larger edits change no output and overflow float32); use a smaller one"
        )
    if not abs(coefficient * scale) <= MAX_VALUE:  # `not <=`: also refuses a NaN or infinite scale
        raise SteeringError(
            f"coefficient {coefficient:g} x scale {scale:g} is past the steering limit |coefficient x scale| <= "
            f"{MAX_VALUE:g} (activation units that keep float32 finite through the model); use a smaller scale"
        )


@dataclass(frozen=True)
class Intervention:
    """An edit at `hook` along latents of `sae` (see `saelab.steering` for the modes).

    `latents`: one latent for add, clamp, orthogonal and cap; any number for ablate. `code` ([d_sae]) replaces
    the latent for `add`: the decoded code is added. Coefficient times `scale` is in activation units. The
    coefficient is checked when the intervention is built (`check_coefficient`); it is frozen, so it stays so
    (`dataclasses.replace` builds, and checks, a new one)."""

    hook: str
    sae: SAE
    latents: list[int] = field(default_factory=list)
    mode: Mode = "add"
    coefficient: float = 0.0
    scale: float = 1.0
    scope: Scope = "all"
    code: Tensor | None = None

    def __post_init__(self) -> None:
        check_coefficient(self.coefficient, self.scale)
        if self.sae.cfg.d_out is not None and self.mode in ("clamp", "ablate"):
            raise SteeringError(
                f"mode {self.mode!r} re-encodes the activation it edits, but a transcoder's latents come from its MLP's "
                "input, not the output it writes; steer a transcoder latent with add, orthogonal or cap"
            )

    @property
    def value(self) -> float:
        """The coefficient in activation units."""
        return self.coefficient * self.scale

    @property
    def is_identity(self) -> bool:
        """Whether the edit leaves every activation as it is (`add` at coefficient 0). Such an edit is skipped, so
        a coefficient-0 result is computed by exactly the code of the unsteered one."""
        return self.mode == "add" and self.value == 0

    def edit(self, h: Tensor, mask: Tensor) -> Tensor:
        """`h` [batch, pos, d_in] edited at the positions where `mask` [pos] is set."""
        W = self.sae.W_dec.to(h.dtype)
        if self.mode == "add":
            v = self.code.to(h) @ W if self.code is not None else W[self.latents[0]]
            out = h + self.value * v
        elif self.mode in ("clamp", "ablate"):
            f = self.sae.encode(h)
            g = f.clone()
            g[..., self.latents] = self.value if self.mode == "clamp" else 0.0
            out = h - self.sae.decode(f) + self.sae.decode(g)
        else:
            v = W[self.latents[0]]
            u = v / v.norm()
            along = h @ u
            target = self.value * v.norm()
            shift = target - along if self.mode == "orthogonal" else (target - along).clamp_max(0)
            out = h + shift[..., None] * u
        return torch.where(mask[None, :, None], out, h)

    def positions(self, pos: Tensor, prompt_length: float) -> Tensor:
        """Which of the absolute positions `pos` are in scope."""
        if self.scope == "all":
            return torch.ones_like(pos, dtype=torch.bool)
        if self.scope == "prompt":
            return pos < prompt_length
        if self.scope == "generated":
            return pos >= prompt_length
        return torch.isin(pos, torch.tensor(self.scope, device=pos.device))


def check_interventions(model: Model, interventions: Sequence[Intervention], embedding: bool = False) -> None:
    """Refuse interventions that cannot apply to `model`, naming the fix. `embedding`: they act on an encoder's
    sentence embedding (hook `EMBEDDING`) rather than at its hook points."""
    if embedding and not is_encoder(model):
        raise SteeringError(f"hook {EMBEDDING!r} is an encoder's sentence embedding; this model is a decoder")
    names = sorted({iv.hook for iv in interventions})
    if not embedding and EMBEDDING in names:
        raise SteeringError(
            f"hook {EMBEDDING!r} is the pooled sentence embedding, not a hook point: steer it with embed or search"
        )
    widths = {EMBEDDING: model.cfg.d_model} if embedding else {p.name: p.d for p in resolve_hooks(model, names)}
    for iv in interventions:
        cfg = iv.sae.cfg
        if cfg.d_out_resolved != widths[iv.hook]:
            raise SteeringError(
                f"the {'transcoder writes d_out' if cfg.d_out is not None else 'SAE reads d_in'}={cfg.d_out_resolved}, "
                f"but {iv.hook} has width {widths[iv.hook]}; "
                f"give an SAE trained on this model's {iv.hook}"
            )
        if iv.mode not in MODES:
            raise SteeringError(f"unknown steering mode {iv.mode!r}; use one of {', '.join(MODES)}")
        bad = [i for i in iv.latents if not 0 <= i < cfg.d_sae]
        if bad:
            raise SteeringError(f"latent {bad[0]} does not exist: the SAE has latents 0 to {cfg.d_sae - 1}")
        if iv.code is not None:
            if iv.mode != "add" or iv.code.shape != (cfg.d_sae,):
                raise SteeringError(
                    f"a code is added (mode add) and has shape [{cfg.d_sae}]; got mode {iv.mode!r} "
                    f"and shape {list(iv.code.shape)}"
                )
        elif iv.mode != "ablate" and len(iv.latents) != 1:
            raise SteeringError(
                f"mode {iv.mode!r} steers exactly one latent (got {len(iv.latents)}); "
                "give one, or use mode ablate for several"
            )
        if iv.scope == "generated" and is_encoder(model):
            raise SteeringError("an encoder generates no tokens; use scope all (or prompt) to steer it")
        if not isinstance(iv.scope, list) and iv.scope not in ("prompt", "generated", "all"):
            raise SteeringError(f"unknown scope {iv.scope!r}; use prompt, generated, all, or a list of positions")


class _Positions:
    """Absolute positions of the activations a hook point sees, across the passes of one generation.

    A pass over one position after an earlier pass continues it (KV-cached generation feeds only the newest
    token); a pass over several positions starts at position 0 (a prompt, or uncached generation)."""

    def __init__(self) -> None:
        self.seen = 0

    def next(self, n: int, device: torch.device) -> Tensor:
        start = self.seen if n == 1 and self.seen > 0 else 0
        self.seen = start + n
        return torch.arange(start, start + n, device=device)


@contextmanager
def steer(
    model: Model,
    interventions: Sequence[Intervention],
    prompt_length: float = math.inf,
    *,
    read: Callable[[str, Tensor, Tensor], None] | None = None,
) -> Iterator[None]:
    """Run `model` with the interventions inside the block. Positions before `prompt_length` are the prompt.

    `read(hook, h, positions)` sees every steered hook point's activation after the edits (identity edits,
    `Intervention.is_identity`, are skipped). An edit that leaves a non-finite activation (in the model's dtype)
    raises a `SteeringError` inside the pass, rather than letting NaN reach the outputs. Use a new block per
    generation or forward pass: positions are counted from the block's start."""
    check_interventions(model, interventions)
    by_hook: dict[str, list[Intervention]] = {}
    for iv in interventions:
        by_hook.setdefault(iv.hook, []).append(iv)

    def make(hook_name: str, ivs: list[Intervention]) -> Callable[..., Tensor]:
        tracker = _Positions()

        def hook(act: Tensor, hook: Any) -> Tensor:
            h = flatten_heads(act).float()
            pos = tracker.next(h.shape[1], h.device)
            edited = False
            for iv in ivs:
                if iv.is_identity:
                    continue
                mask = iv.positions(pos, prompt_length)
                if bool(mask.any()):
                    h, edited = iv.edit(h, mask), True
            out = h.to(act.dtype)
            if edited and not bool(out.isfinite().all()):
                raise SteeringError(
                    f"steering made the activations at {hook_name} non-finite in the model's {act.dtype} (the edit "
                    "overflows it); use a smaller coefficient, or an SAE whose decoder weights are finite"
                )
            if read is not None:
                read(hook_name, h, pos)
            return out.reshape(act.shape)

        return hook

    with model.hooks(fwd_hooks=[(h, make(h, ivs)) for h, ivs in by_hook.items()]):
        yield
