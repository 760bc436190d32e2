"""Faithfulness and completeness of an attribution graph, measured by intervention in the replacement model, on the
prompt it was found on and on held-out prompts of the same task.

The replacement model is the model with every MLP replaced by its transcoder plus an error node (`saelab.circuits.
splice`: `dec(f) + err` in place of the MLP's output, so with nothing ablated it is the model itself; attention is not
frozen). A graph's circuit is its kept latent and error nodes (`AttributionGraph.node_mask`); token nodes are never
ablated. Every latent and error node outside the circuit is set to zero: circuit-tracer's ablation of a transcoder
latent (`feature_intervention` with the value 0), and the baseline the graph's own edges are measured against (a
source's direct effect is that of `a_s * W_dec[s]` against nothing). Mean ablation (Marks et al. 2024) is not offered
here: the mean over the one prompt a graph is found on is the prompt itself. As in Marks et al.'s sparse feature
circuits (`saelab.circuits.spread`), faithfulness = (m(graph) - m(empty)) / (m(full) - m(empty)) and completeness =
(m(full without the graph) - m(empty)) / (m(full) - m(empty)), with m the target's logit (or its logit minus a
distractor's) at the last position, `empty` every latent and error node zero (each MLP writes only its transcoder's
decoder bias) and `full` nothing ablated; kept nodes run normally, so they respond to ablations upstream of them.

On held-out prompts a node is kept at the same (layer, position, latent) (`granularity` "position": held-out prompts
must have the graph's length) or as (layer, latent) at every position ("feature", the circuits code's `all` position
group, which transfers to prompts of another length or with the answer elsewhere); a layer's error node likewise at
its position or at every position. Nodes of the circuit that never fire on a set of prompts (a latent that is zero,
there, on every prompt) are not counted as circuit nodes of that set (`groups.fires`), and how many were left out is
reported. The figures over each set come with a percentile-bootstrap 95% interval and the per-example range
(`spread.spread_curve`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from saelab.circuits.attribution_graph import AttributionGraph, by_layer
from saelab.circuits.groups import fires
from saelab.circuits.splice import clean_states
from saelab.circuits.spread import RESAMPLES, Spread, spread_curve
from saelab.circuits.tasks import Task, token_metric
from saelab.dictionaries import SAE
from saelab.errors import CircuitError

Granularity = Literal["position", "feature"]
GRANULARITIES: tuple[Granularity, ...] = ("position", "feature")


@dataclass
class GraphCheckConfig:
    """How a graph's faithfulness is measured."""

    granularity: Granularity = "position"
    """`position`: each node kept at its (layer, position, latent), held-out prompts of the graph's length only;
    `feature`: each (layer, latent) kept at every position (a layer's error node too), for prompts of any length."""
    target: int | None = None
    """The token whose logit the metric reads at the last position; `None`: the graph's most probable logit."""
    distractor: int | None = None
    """A token id: the metric becomes the target's logit minus this one's (a logit difference); `None`: the target's
    logit alone."""
    resamples: int = RESAMPLES
    """Bootstrap resamples of the prompts for the 95% intervals."""
    seed: int = 0
    """The bootstrap's seed."""


class GraphFaithfulness(NamedTuple):
    """A graph's faithfulness and completeness where it was found and on held-out prompts."""

    granularity: Granularity
    """How its nodes were kept (`GraphCheckConfig.granularity`)."""
    target: int
    """The token whose logit the metric reads."""
    distractor: int | None
    """The token whose logit it subtracts, if any."""
    found_on: Spread
    """On the graph's own prompt (one example: its interval and range are the figure itself); `n` holds the circuit
    nodes counted there."""
    held_out: Spread | None
    """On the held-out prompts (`None` when none were given); `n` holds the circuit nodes counted there."""
    found_on_silent: int
    """Circuit nodes that never fire on the graph's own prompt, not counted."""
    held_out_silent: int
    """Circuit nodes that never fire on any held-out prompt, not counted (0 without held-out prompts)."""


def check_held_out_lengths(
    n_pos: int, lengths: Collection[int], granularity: Granularity, *, fix: str = "granularity 'feature'"
) -> None:
    """`CircuitError` when held-out prompts of these token `lengths` cannot be measured against a graph of `n_pos`
    positions: when they differ from one another, or, with nodes kept by position (`granularity` "position"), from
    `n_pos`; `fix` names the option that keeps nodes at every position, as the caller spells it."""
    found = sorted(set(lengths))
    if len(found) > 1:
        raise CircuitError(
            f"the held-out prompts have {len(found)} lengths ({', '.join(map(str, found))} tokens); "
            "give prompts of one length"
        )
    if granularity == "position" and found and found[0] != n_pos:
        raise CircuitError(
            f"the held-out prompts are {found[0]} tokens long and the graph's prompt {n_pos}; nodes are kept by "
            f"position, so give held-out prompts of the same length (or {fix}, which keeps each (layer, latent) at "
            "every position)"
        )


def graph_masks(
    graph: AttributionGraph, keep: Tensor, d_sae: Mapping[int, int], granularity: Granularity
) -> dict[int, Tensor]:
    """Per layer the node mask `[pos, d_sae[L] + 1]` (the error node last) of its transcoder for the latent and error
    nodes in `keep` (`[n_nodes]` over the graph's nodes; tokens and logits ignored): `pos` is the graph's positions
    (`position`), or 1, every position (`feature`)."""
    by_pos = granularity == "position"
    masks = {layer: torch.zeros(graph.n_pos if by_pos else 1, d + 1, dtype=torch.bool) for layer, d in d_sae.items()}
    f = graph.n_features
    for layer, pos, latent in graph.latents[keep[:f]].tolist():
        masks[layer][pos if by_pos else 0, latent] = True
    for node in keep[f : f + graph.n_layers * graph.n_pos].nonzero()[:, 0].tolist():
        layer, pos = divmod(node, graph.n_pos)
        masks[layer][pos if by_pos else 0, -1] = True
    return masks


def _task(tokens: Tensor, target: int, distractor: int | None) -> Task:
    batch = len(tokens)
    metric = token_metric(
        "logit" if distractor is None else "logit_diff",
        torch.full((batch,), tokens.shape[1] - 1),
        torch.full((batch,), target),
        distractor=None if distractor is None else torch.full((batch,), distractor),
    )
    return Task(tokens, metric)


def _measure(
    model: Any, saes: dict[str, SAE], task: Task, masks: dict[str, Tensor], cfg: GraphCheckConfig
) -> tuple[Spread, int]:
    """The spread of the circuit `masks` on `task` with the nodes that never fire there left out, and their number."""
    clean = clean_states(model, saes, task.tokens)
    live = fires(clean)
    if cfg.granularity == "feature":
        live = {h: v.any(0, keepdim=True) for h, v in live.items()}
    counted = {h: m & live[h] for h, m in masks.items()}
    silent = sum(int((m & ~live[h]).sum()) for h, m in masks.items())
    n = sum(int(m.sum()) for m in counted.values())
    spread = spread_curve(
        model,
        saes,
        task,
        keeps=[counted],
        sizes=[n],
        resamples=cfg.resamples,
        seed=cfg.seed,
        ablation="zero",
        states=clean,
    )
    return spread, silent


@torch.no_grad()
def graph_faithfulness(
    model: Any,
    transcoders: Mapping[int, SAE] | Sequence[SAE],
    graph: AttributionGraph,
    held_out: Tensor | None = None,
    *,
    cfg: GraphCheckConfig | None = None,
    keep: Tensor | None = None,
) -> GraphFaithfulness:
    """Faithfulness and completeness of `graph`'s circuit (its kept latent and error nodes, or those of `keep`,
    `[n_nodes]`) in the replacement model of `model` with `transcoders` (the ones the graph was built with), on the
    graph's prompt and on the `held_out` prompts (`[batch, pos]` token ids of the same task, BOS first as the graph's
    prompt), every node outside the circuit zero-ablated. `CircuitError` for held-out prompts of another length when
    nodes are kept by position (`check_held_out_lengths`)."""
    cfg = cfg or GraphCheckConfig()
    tcs = by_layer(transcoders)
    keep = graph.node_mask if keep is None else keep
    if keep.shape != (graph.n_nodes,) or keep.dtype != torch.bool:
        raise CircuitError(f"keep must be a bool mask over the graph's {graph.n_nodes} nodes, got {tuple(keep.shape)}")
    if held_out is not None:
        check_held_out_lengths(graph.n_pos, [held_out.shape[-1]], cfg.granularity)
    saes = {f"blocks.{layer}.hook_mlp_out": tc for layer, tc in tcs.items()}
    d_sae = {layer: tc.cfg.d_sae for layer, tc in tcs.items()}
    masks = {f"blocks.{layer}.hook_mlp_out": m for layer, m in graph_masks(graph, keep, d_sae, cfg.granularity).items()}
    target = int(graph.logit_tokens[0]) if cfg.target is None else cfg.target
    found = _task(graph.tokens[None], target, cfg.distractor)
    found_on, found_silent = _measure(model, saes, found, masks, cfg)
    other, held_silent = None, 0
    if held_out is not None:
        held = _task(held_out.reshape(-1, held_out.shape[-1]).cpu(), target, cfg.distractor)
        other, held_silent = _measure(model, saes, held, masks, cfg)
    return GraphFaithfulness(cfg.granularity, target, cfg.distractor, found_on, other, found_silent, held_silent)
