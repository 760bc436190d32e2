"""Spliced forward passes: the model with its activations at SAE hook points replaced by `dec(f) + err`, the
nodes (`Nodes`: latents and errors) of each hook point, their clean and baseline values, and running many
interventions in one pass over replicas of the examples."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import Tensor

from saelab.dictionaries import SAE
from saelab.errors import CircuitError
from saelab.models import HOOK_KINDS, HookPoint, Model, flatten_heads, forward_to, is_encoder, locate, resolve_hooks

if TYPE_CHECKING:
    from saelab.circuits.tasks import Task

Baseline = Literal["patch", "zero", "mean"]


@dataclass(frozen=True)
class Splice:
    """A dictionary's edit of the activation at the hook point it writes: `fn(x, x_in)`, where `x_in` is the
    activation at `reads` in the same forward pass (a transcoder's input, `blocks.L.hook_mlp_in`, as the edit of
    earlier hook points left it) or `x` itself (`reads` None: an SAE, which reads where it writes)."""

    fn: Callable[[Tensor, Tensor], Tensor]
    """The edit: the new activation (flattened over heads) from the old one and the dictionary's input."""
    reads: str | None = None
    """The hook point the dictionary reads, when it is not the one it writes."""


Edit = Callable[[Tensor], Tensor] | Splice
"""An edit of one hook point's activation: a plain function of it, or a dictionary's `Splice`."""
T = TypeVar("T")
CHUNK_ELEMENTS = 2**27  # node values held for one pass over replicas of the examples (0.5 GB in float32)


def spliced_output(model: Model, tokens: Tensor, edits: dict[str, Edit]) -> Tensor:
    """The model's output with `edits[hook](x) -> x'` applied (x flattened over heads; a `Splice` that reads another
    hook point also gets the activation there): logits for decoders, the last layer's residual stream (output
    embeddings) for encoders."""
    inputs: dict[str, Tensor] = {}

    def wrap(edit: Edit) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            x = flatten_heads(act).float()
            if isinstance(edit, Splice):
                if edit.reads is not None and edit.reads not in inputs:
                    raise CircuitError(
                        f"{edit.reads} did not run before {hook.name}: a transcoder reads its MLP's input"
                    )
                x_in = x if edit.reads is None else inputs[edit.reads]
                return edit.fn(x, x_in).to(act.dtype).reshape(act.shape)
            return edit(x).to(act.dtype).reshape(act.shape)

        return hook

    def keeper(point: HookPoint) -> Callable[..., None]:
        def keep(act: Tensor, hook: Any) -> None:
            inputs[point.name] = point.value(act).float()

        return keep

    needed = sorted({e.reads for e in edits.values() if isinstance(e, Splice) and e.reads is not None})
    # the inputs are kept after any edit of their own hook point has run (hooks on a point run in this order); each
    # is read where the model holds it (`locate`: a `hook_mlp_in` is what the MLP reads, as harvests store it)
    fwd_hooks: list[tuple[str, Callable[..., Any]]] = [(h, wrap(e)) for h, e in edits.items()]
    kept = [(p.hook, keeper(p)) for p in (locate(model, h) for h in needed)]
    with model.hooks(fwd_hooks=[*fwd_hooks, *kept]):
        if not is_encoder(model):
            return model(tokens, return_type="logits")
        return forward_to(model, tokens, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")


@dataclass
class Nodes:
    """The nodes of one hook point: its SAE's latents and its error."""

    f: Tensor
    """The latents [..., pos, d_sae]."""
    err: Tensor
    """The error `x - dec(enc(x))` [..., pos, d_in]."""

    def __sub__(self, other: Nodes) -> Nodes:
        return Nodes(self.f - other.f, self.err - other.err)

    def lerp(self, delta: Nodes, alpha: float) -> Nodes:
        """The point `alpha` of the way along `delta`."""
        return Nodes(self.f + alpha * delta.f, self.err + alpha * delta.err)

    def dot(self, other: Nodes) -> Tensor:
        """Per-node products: latents elementwise, the error summed over its dimensions -> [..., pos, d_sae + 1]."""
        return torch.cat([self.f * other.f, (self.err * other.err).sum(-1, keepdim=True)], -1)

    def tile(self, reps: int) -> Nodes:
        """`reps` copies along the batch."""
        return Nodes(self.f.repeat(reps, *[1] * (self.f.ndim - 1)), self.err.repeat(reps, *[1] * (self.err.ndim - 1)))

    def mean(self) -> Nodes:
        """The mean over the examples (the batch, kept as an axis of length 1)."""
        return Nodes(self.f.mean(0, keepdim=True), self.err.mean(0, keepdim=True))

    def with_grad(self) -> Nodes:
        """Detached copies that require gradients (leaves for `torch.autograd.grad`)."""
        return Nodes(self.f.detach().requires_grad_(), self.err.detach().requires_grad_())


def reads(sae: SAE) -> str | None:
    """The model's hook point a transcoder reads (its MLP's input; a store's `alias/` prefix dropped); None for an
    SAE, which reads the hook point it writes."""
    return sae.cfg.hook_name.rpartition("/")[2] if sae.cfg.d_out is not None else None


def output(sae: SAE, f: Tensor, x_in: Tensor) -> Tensor:
    """What the dictionary writes for latents `f`: `dec(f)`, plus a skip transcoder's linear skip of its input
    `x_in` (`SAE.forward` is `output(sae, sae.encode(x), x)`)."""
    out = sae.decode(f)
    if sae.W_skip is None:
        return out
    return out + (sae.prepare_input(x_in) @ sae.W_skip.T / sae.output_scale).view_as(out)


def encode_nodes(sae: SAE, x: Tensor, x_in: Tensor | None = None) -> Nodes:
    """The nodes of activation `x`: its latents and what the dictionary misses. A transcoder's latents come from its
    input `x_in` and its error node is the MLP's output `x` minus the transcoder's."""
    x_in = x if x_in is None else x_in
    f = sae.encode(x_in)
    return Nodes(f, x - output(sae, f, x_in))


def splice(sae: SAE, fn: Callable[[Tensor, Tensor], Tensor]) -> Splice:
    """`fn(x, x_in)` as the edit of the hook point `sae` writes, with `x_in` what it reads."""
    return Splice(fn, reads(sae))


def set_nodes(sae: SAE, value: Nodes) -> Edit:
    """An edit that replaces the hook point's activation by `dec(f) + err` of the given nodes (plus a skip
    transcoder's skip of its input in this forward pass)."""
    return splice(sae, lambda x, x_in: output(sae, value.f, x_in) + value.err)


def check_saes(model: Model, saes: dict[str, SAE]) -> list[str]:
    """The dictionaries' hook points (each keyed by the one it writes: a transcoder by its MLP's output) in the
    order the forward pass reaches them; `CircuitError` if one does not fit."""
    if not saes:
        raise CircuitError("no SAEs: give at least one {hook point: SAE}")
    points = sorted(resolve_hooks(model, list(saes)), key=lambda p: (p.layer, HOOK_KINDS.index(p.kind)))
    for point in points:
        sae = saes[point.name]
        d_out = sae.cfg.d_out_resolved
        if sae.cfg.d_out is not None:
            source = reads(sae)
            if sae.cfg.hook_name_out and sae.cfg.hook_name_out.rpartition("/")[2] != point.name:
                raise CircuitError(
                    f"the transcoder given for {point.name} writes {sae.cfg.hook_name_out}; key it by the hook point "
                    "it writes (its MLP's output)"
                )
            if source is None or locate(model, source).hook not in model.hook_dict:
                raise CircuitError(
                    f"the transcoder for {point.name} reads {source!r}, which this model has no hook for"
                )
        if d_out != point.d:
            raise CircuitError(
                f"the SAE for {point.name} writes d={d_out}, but that hook point has width {point.d}; give an SAE "
                f"trained on this model's {point.name}"
            )
    return [p.name for p in points]


def _recorder(sae: SAE, hook: str, states: dict[str, Nodes]) -> Edit:
    def edit(x: Tensor, x_in: Tensor) -> Tensor:
        states[hook] = encode_nodes(sae, x, x_in)
        return x

    return splice(sae, edit)


@torch.no_grad()
def clean_states(model: Model, saes: dict[str, SAE], tokens: Tensor) -> dict[str, Nodes]:
    """Latents and errors of every SAE on `tokens` (each hook point computed from the unmodified model)."""
    states: dict[str, Nodes] = {}
    spliced_output(model, tokens, {h: _recorder(s, h, states) for h, s in saes.items()})
    return states


def baseline_states(
    model: Model, saes: dict[str, SAE], task: Task, *, baseline: Baseline, clean: dict[str, Nodes]
) -> dict[str, Nodes]:
    """Node values at the baseline: on the patch input, zero, or the clean mean over examples (per position)."""
    if baseline == "patch":
        if task.patch is None:
            raise CircuitError(
                "baseline 'patch' needs a patch input (e.g. a patch text per prompt); or use baseline 'mean' or 'zero'"
            )
        if task.patch.shape != task.tokens.shape:
            raise CircuitError(
                f"patch input has shape {tuple(task.patch.shape)}, clean {tuple(task.tokens.shape)}; they must match"
            )
        return clean_states(model, saes, task.patch)
    if baseline == "zero":
        return {h: Nodes(torch.zeros_like(s.f), torch.zeros_like(s.err)) for h, s in clean.items()}
    return {h: s.mean().tile(len(s.f)) for h, s in clean.items()}


def metric_total(model: Model, task: Task, edits: dict[str, Edit], reps: int = 1) -> Tensor:
    """The task's metric with `edits` applied, on `reps` replicas of the examples [reps * batch]."""
    tokens = task.tokens.repeat(reps, 1)
    return task.metric(spliced_output(model, tokens, edits))


# ------------------------------------------------------------------------ replicas: many edits in one pass


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    """`items` in consecutive lists of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fit_replicas(chunk: int, task: Task, saes: dict[str, SAE]) -> int:
    """At most `chunk` replicas of the examples per pass; fewer where their node values would exceed CHUNK_ELEMENTS."""
    per_replica = task.tokens.numel() * max(s.cfg.d_sae + s.cfg.d_in for s in saes.values())
    return max(1, min(chunk, CHUNK_ELEMENTS // per_replica))


def node_masks(nodes: list[tuple[int, int]], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One-hot [len(nodes), pos, d_sae + 1] masks of (position, index) nodes."""
    mask = torch.zeros(len(nodes), *shape, dtype=torch.bool, device=device)
    if nodes:
        idx = torch.tensor(nodes, device=device)
        mask[torch.arange(len(nodes), device=device), idx[:, 0], idx[:, 1]] = True
    return mask


def where_nodes(mask: Tensor, new: Nodes, old: Nodes, *, reps: int, batch: int) -> Nodes:
    """Node values for `reps` replicas of the examples: from `new` where mask[k] ([pos, d_sae + 1], or
    [1, d_sae + 1] for every position) is set, else from `old`. Values are per replica ([reps * batch, ...]),
    per example ([batch, ...]) or shared ([1, ...])."""

    def split(t: Tensor) -> Tensor:
        return t.view(reps, batch, *t.shape[1:]) if t.shape[0] == reps * batch else t[None]

    mask = mask[:, None]
    f = torch.where(mask[..., :-1], split(new.f), split(old.f))
    err = torch.where(mask[..., -1:], split(new.err), split(old.err))
    return Nodes(f.flatten(0, 1), err.flatten(0, 1))
