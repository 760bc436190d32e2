"""Attribution graphs over transcoders (Ameisen et al. 2025, "Circuit Tracing"), following circuit-tracer
(`safety-research/circuit-tracer`: `circuit_tracer/attribution.py` `attribute`, `circuit_tracer/graph.py`
`prune_graph`, `compute_influence`, `compute_graph_scores`).

The local replacement model of one prompt: every MLP of a TransformerLens decoder is replaced by its transcoder plus
an error node (the MLP's output minus the transcoder's, per position), and the attention patterns and normalisation
scales are frozen at their values on the prompt. What remains is linear in the residual stream, so the direct effect
of a source node (a transcoder latent's output `a_s * W_dec[s]`, an error vector, a token's embedding) on a target
(a latent's pre-activation `W_enc[:, t] . x`, or a logit minus the mean logit) is the gradient of the target
contracted with the source's vector, with every MLP output held fixed (direct paths only). As in circuit-tracer the
graph starts from the logits that carry `desired_logit_prob` of the probability (at most `max_n_logits`), then
visits latents in batches in order of their influence so far (`update_interval`), up to `max_feature_nodes`.

Where saelab departs from circuit-tracer, and why:

- The backward passes are saelab's own adjoint of the frozen model, not autograd through TransformerLens: the
  attention pattern of each layer is recomputed from the cached queries and keys in blocks of `query_block` query
  positions, so memory grows with the positions times the batch and with the nodes kept, never with context length
  squared (circuit-tracer keeps `batch x heads x n x n` patterns for autograd). The edge matrix has one row per
  visited latent and logit (circuit-tracer's `edge_matrix` before it squares it), not `n_nodes x n_nodes`.
- A token node's vector is the embedding plus the positional embedding at its position (circuit-tracer's models have
  rotary positions, so theirs is the embedding alone).
- Attention terms (circuit-tracer#53): each kept edge is split over the heads that carry it, by the lowest head its
  paths pass through (the head that reads the source's position), plus the rest (the residual-stream path, and a
  skip transcoder's skips): `AttributionGraph.head_split`; these add up to the edge exactly.
- A request whose memory estimate exceeds `GraphConfig.memory_budget_mb` is refused before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import torch
from torch import Tensor

from saelab.dictionaries.base import SAE
from saelab.errors import CircuitError, ConfigError

FLOAT_BYTES = 4
CONTRACT_BLOCK = 1024
"""Source columns contracted with a batch's gradients at a time."""


@dataclass
class GraphConfig:
    """What one attribution graph computes and how much it may use."""

    max_n_logits: int = 10
    """The most logit nodes (circuit-tracer's `max_n_logits`)."""
    desired_logit_prob: float = 0.95
    """Logits are added, most probable first, until their probabilities add up to this (circuit-tracer's)."""
    max_feature_nodes: int | None = None
    """The most latents whose incoming edges are computed, visited in order of influence; `None`: all active ones."""
    batch_size: int = 64
    """Target nodes per backward pass."""
    update_interval: int = 4
    """Batches visited between re-rankings of the latents by influence (circuit-tracer's `update_interval`)."""
    node_threshold: float = 0.8
    """Pruning keeps the nodes that carry this fraction of the influence on the logits (circuit-tracer's)."""
    edge_threshold: float = 0.98
    """Pruning keeps the edges that carry this fraction of the edge influence (circuit-tracer's)."""
    query_block: int = 256
    """Query positions per block when the frozen attention pattern is recomputed in the backward passes."""
    memory_budget_mb: float = 4096.0
    """A graph whose memory estimate (`estimate_memory_mb`) exceeds this many MiB is refused before it starts."""


class ActiveLatents(NamedTuple):
    """The active transcoder latents of a prompt, ordered by layer then position."""

    index: Tensor
    """`[n, 3]` (layer, position, latent) of each active latent."""
    value: Tensor
    """`[n]` its activation."""


class KeptEdge(NamedTuple):
    """One edge of a pruned graph."""

    source: int
    """Source node."""
    target: int
    """Target node (a latent or a logit)."""
    weight: float
    """Its direct effect."""
    heads: dict[str, float]
    """The part of `weight` each head carries (`L{layer}.H{head}`), and `resid` for the part that passes no head."""


@dataclass
class AttributionGraph:
    """An attribution graph of one prompt. Nodes are numbered `[latents (n_features), errors (n_layers x n_pos, layer
    major), tokens (n_pos), logits (n_logits)]`, as in circuit-tracer's `Graph`; only the latents have incoming edges
    besides the logits, so `adjacency` keeps one row per latent and logit."""

    tokens: Tensor
    """`[n_pos]` the prompt's token ids."""
    latents: Tensor
    """`[n_features, 3]` (layer, position, latent) of each latent node (the visited ones)."""
    activations: Tensor
    """`[n_features]` each latent node's activation."""
    logit_tokens: Tensor
    """`[n_logits]` the vocabulary ids of the logit nodes."""
    logit_probs: Tensor
    """`[n_logits]` their probabilities at the last position."""
    adjacency: Tensor
    """`[n_features + n_logits, n_nodes - n_logits]` direct effects: row = target (latent, then logit), column =
    source node."""
    n_layers: int
    """Layers of the model (one transcoder each)."""
    node_mask: Tensor
    """`[n_nodes]` the nodes pruning keeps (`prune`; all `True` before)."""
    edge_mask: Tensor
    """`[n_features + n_logits, n_nodes - n_logits]` the edges pruning keeps."""
    head_names: list[str]
    """Names of the columns of `head_split` (`L{layer}.H{head}`, then `resid`)."""
    head_split: Tensor
    """`[n_kept_edges, n_heads_total + 1]` each kept edge (in the order of `edge_mask.nonzero()`) split over the
    heads its paths pass through lowest, then the rest; each row adds up to its edge."""

    @property
    def n_pos(self) -> int:
        """Positions of the prompt."""
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        """Latent nodes."""
        return len(self.latents)

    @property
    def n_nodes(self) -> int:
        """All nodes."""
        return self.n_features + (self.n_layers + 1) * self.n_pos + len(self.logit_tokens)

    def node_kind(self, node: int) -> str:
        """`latent`, `error`, `token` or `logit`."""
        bounds = _bounds(self)
        return next(k for k, (lo, hi) in bounds.items() if lo <= node < hi)

    def node_label(self, node: int) -> str:
        """A short name: `L{layer}/{latent}@{pos}`, `err L{layer}@{pos}`, `tok {id}@{pos}` or `logit {id}`."""
        kind, (lo, _) = self.node_kind(node), _bounds(self)[self.node_kind(node)]
        if kind == "latent":
            layer, pos, latent = self.latents[node].tolist()
            return f"L{layer}/{latent}@{pos}"
        if kind == "error":
            layer, pos = divmod(node - lo, self.n_pos)
            return f"err L{layer}@{pos}"
        if kind == "token":
            return f"tok {int(self.tokens[node - lo])}@{node - lo}"
        return f"logit {int(self.logit_tokens[node - lo])}"

    def node_layer_pos(self, node: int) -> tuple[int, int]:
        """(layer, position) of a node for a layer x position layout: tokens at layer -1, logits at `n_layers` and the
        last position."""
        kind, (lo, _) = self.node_kind(node), _bounds(self)[self.node_kind(node)]
        if kind == "latent":
            return int(self.latents[node, 0]), int(self.latents[node, 1])
        if kind == "error":
            layer, pos = divmod(node - lo, self.n_pos)
            return layer, pos
        if kind == "token":
            return -1, node - lo
        return self.n_layers, self.n_pos - 1

    def row_of(self, node: int) -> int | None:
        """The `adjacency` row of a node (latents and logits), `None` for errors and tokens."""
        logit0 = self.n_nodes - len(self.logit_tokens)
        if node < self.n_features:
            return node
        return self.n_features + node - logit0 if node >= logit0 else None

    def kept_edges(self, min_share: float = 0.01) -> list[KeptEdge]:
        """The edges pruning keeps, each with the heads that carry at least `min_share` of it (and `resid`, the part
        that passes no head)."""
        logit0 = self.n_nodes - len(self.logit_tokens)
        edges = []
        for (row, col), split in zip(self.edge_mask.nonzero().tolist(), self.head_split.tolist(), strict=True):
            target = row if row < self.n_features else logit0 + row - self.n_features
            weight = float(self.adjacency[row, col])
            heads = {h: v for h, v in zip(self.head_names, split, strict=True) if abs(v) >= min_share * abs(weight)}
            edges.append(KeptEdge(col, target, weight, heads))
        return edges


def _bounds(graph: AttributionGraph) -> dict[str, tuple[int, int]]:
    f, e = graph.n_features, graph.n_layers * graph.n_pos
    t = f + e + graph.n_pos
    return {"latent": (0, f), "error": (f, f + e), "token": (f + e, t), "logit": (t, t + len(graph.logit_tokens))}


class GraphScores(NamedTuple):
    """circuit-tracer's `compute_graph_scores`."""

    replacement: float
    """Of the influence of tokens and errors on the logits, the fraction that comes from tokens (through latents)."""
    completeness: float
    """The influence-weighted fraction of every node's normalised input that does not come from error nodes."""


# ---------------------------------------------------------------------------------------------- the frozen model


@dataclass
class _Layer:
    """What the adjoint of one block needs: frozen scales, queries and keys, weights, the transcoder's state."""

    ln1_scale: Tensor | None
    ln2_scale: Tensor | None
    q: Tensor
    k: Tensor
    error: Tensor
    mlp_in: Tensor


def _check(model: Any, transcoders: Mapping[int, SAE]) -> None:
    cfg = model.cfg
    missing = [layer for layer in range(cfg.n_layers) if layer not in transcoders]
    if cfg.attn_only or missing:
        raise ConfigError(
            f"an attribution graph replaces every MLP by a transcoder, but layers {missing} have none"
            + (" (the model is attention-only)" if cfg.attn_only else "")
            + "; train a transcoder of blocks.L.hook_mlp_in -> blocks.L.hook_mlp_out for every layer"
        )
    unsupported = {
        "normalization_type": cfg.normalization_type not in (None, "LN", "LNPre", "RMS", "RMSPre"),
        "positional_embedding_type": cfg.positional_embedding_type not in ("standard", "rotary"),
        "n_key_value_heads": getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads),
        "attn_scores_soft_cap": float(getattr(cfg, "attn_scores_soft_cap", -1.0)) > 0,
        "parallel_attn_mlp": bool(getattr(cfg, "parallel_attn_mlp", False)),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ConfigError(
            f"attribution graphs support LN/RMS or no normalisation, standard or rotary positions and plain multi-head "
            f"attention; this model's {bad} are not supported; use a GPT-2/LLaMA-style TransformerLens decoder"
        )
    for layer, tc in transcoders.items():
        if tc.cfg.d_out is None or tc.whiten_mean is not None or float(tc.input_scale) != 1 or tc.output_scale != 1:
            raise ConfigError(
                f"layer {layer}'s dictionary is not a transcoder with its preprocessing folded into its weights; give "
                "transcoders loaded from a run (saved dictionaries have their scales folded)"
            )


def _ln_adjoint(g: Tensor, scale: Tensor | None, weight: Tensor | None, *, centre: bool) -> Tensor:
    """Adjoint of a normalisation with its scale frozen: `x -> centre(x) / scale * w` transposed."""
    if scale is None:
        return g
    if weight is not None:
        g = g * weight
    g = g / scale
    return g - g.mean(-1, keepdim=True) if centre else g


def _norm_parts(module: Any) -> tuple[Tensor | None, bool]:
    weight = getattr(module, "w", None)
    return (weight.detach() if isinstance(weight, Tensor) else None), "RMS" not in type(module).__name__


class _Frozen:
    """The local replacement model of one prompt: one clean forward pass caches everything the adjoint reads."""

    def __init__(self, model: Any, transcoders: Mapping[int, SAE], tokens: Tensor) -> None:
        cfg = model.cfg
        self.model, self.transcoders, self.cfg = model, transcoders, cfg
        names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale"]
        rot = cfg.positional_embedding_type == "rotary"
        for layer in range(cfg.n_layers):
            names += [f"blocks.{layer}.{h}" for h in ("ln1.hook_scale", "ln2.hook_scale", "hook_mlp_out")]
            names += [f"blocks.{layer}.attn.{'hook_rot_q' if rot else 'hook_q'}", f"blocks.{layer}.attn.hook_k"]
            names += [f"blocks.{layer}.attn.hook_rot_k", f"blocks.{layer}.hook_resid_mid"]
        with torch.no_grad():
            logits, run_cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
        cache: dict[str, Tensor] = dict(run_cache.items())
        self.logits = logits[0, -1].float()
        embed = cache["hook_embed"][0]
        self.token_vecs = embed + cache["hook_pos_embed"][0] if "hook_pos_embed" in cache else embed
        self.final_scale = cache["ln_final.hook_scale"][0] if "ln_final.hook_scale" in cache else None
        self.layers: list[_Layer] = []
        rows: list[Tensor] = []
        values: list[Tensor] = []
        for layer in range(cfg.n_layers):
            pre = f"blocks.{layer}."
            tc = transcoders[layer]
            with torch.no_grad():
                mlp_in = model.blocks[layer].ln2(cache[pre + "hook_resid_mid"])[0]  # saelab's hook_mlp_in
                acts = tc.encode(mlp_in)
                error = cache[pre + "hook_mlp_out"][0] - tc(mlp_in)
            q = cache[pre + ("attn.hook_rot_q" if rot else "attn.hook_q")][0]
            k = cache[pre + ("attn.hook_rot_k" if rot else "attn.hook_k")][0]
            self.layers.append(
                _Layer(
                    ln1_scale=cache[pre + "ln1.hook_scale"][0] if pre + "ln1.hook_scale" in cache else None,
                    ln2_scale=cache[pre + "ln2.hook_scale"][0] if pre + "ln2.hook_scale" in cache else None,
                    q=q.float(),
                    k=k.float(),
                    error=error.float(),
                    mlp_in=mlp_in.float(),
                )
            )
            pos, latent = acts.nonzero(as_tuple=True)
            rows.append(torch.stack([torch.full_like(pos, layer), pos, latent], 1))
            values.append(acts[pos, latent].float())
        self.active = ActiveLatents(torch.cat(rows), torch.cat(values))
        self.n_pos = len(tokens)

    def attention_blocks(self, layer: int, block: int) -> Iterator[tuple[slice, Tensor]]:
        """The frozen pattern `[heads, block, keys]` of each block of query positions, one block at a time (the keys
        up to the block's last query: causal)."""
        lay, n = self.layers[layer], self.n_pos
        scale = float(self.model.blocks[layer].attn.attn_scale)
        for start in range(0, n, block):
            rows = slice(start, min(start + block, n))
            scores = torch.einsum("qhd,khd->hqk", lay.q[rows], lay.k[: rows.stop]) / scale
            future = torch.arange(rows.stop)[None, :] > torch.arange(rows.start, rows.stop)[:, None]
            yield rows, scores.masked_fill(future, float("-inf")).softmax(-1)


@dataclass
class _Targets:
    """One backward batch: where each target's gradient enters and with what vector."""

    layer: Tensor
    """`[b]` the layer whose MLP input the target reads (`n_layers`: a logit, read at the last position)."""
    pos: Tensor
    """`[b]` its position."""
    vec: Tensor
    """`[b, d]` what is injected there (an encoder column, or a demeaned unembedding column)."""


class _Sources(NamedTuple):
    """The vectors every source node writes, in column order."""

    pos: Tensor
    """`[n_cols]` position of each source column."""
    layer: Tensor
    """`[n_cols]` where its vector is read: a latent's or error's layer (`mlp_out`), `-1` for tokens."""
    vec: Tensor
    """`[n_cols, d]` the vector it writes."""


def _backward(
    frozen: _Frozen,
    targets: _Targets,
    sources: _Sources,
    *,
    query_block: int,
    head_edges: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Rows `[b, n_cols]` of direct effects of every source on each target, by the adjoint of the frozen model; with
    `head_edges` (batch rows, source columns of edges to split) also `[n_edges, n_heads_total]` each edge's part
    through the heads it passes through lowest."""
    model, cfg = frozen.model, frozen.cfg
    b, n, d = len(targets.layer), frozen.n_pos, cfg.d_model
    g = torch.zeros(b, n, d)
    rows = torch.zeros(b, len(sources.pos))
    split = None if head_edges is None else torch.zeros(len(head_edges[0]), cfg.n_layers * cfg.n_heads)
    batch = torch.arange(b)

    def contract(grad: Tensor, layer: int) -> None:
        cols = (sources.layer == layer).nonzero()[:, 0]
        for chunk in cols.split(CONTRACT_BLOCK):
            rows[:, chunk] = torch.einsum("bcd,cd->bc", grad[:, sources.pos[chunk]], sources.vec[chunk])

    logits = targets.layer == cfg.n_layers
    if logits.any():
        weight, centre = _norm_parts(model.ln_final) if frozen.final_scale is not None else (None, False)
        scale = frozen.final_scale[-1] if frozen.final_scale is not None else None
        g[batch[logits], n - 1] = _ln_adjoint(targets.vec[logits], scale, weight, centre=centre)
    for layer in reversed(range(cfg.n_layers)):
        lay, block, tc = frozen.layers[layer], model.blocks[layer], frozen.transcoders[layer]
        contract(g, layer)  # sources writing at this layer's MLP output see the gradient of its resid_post
        w2, centre2 = _norm_parts(block.ln2)
        g_in = torch.zeros_like(g)
        if tc.W_skip is not None:
            g_in += g @ tc.W_skip.detach()
        here = targets.layer == layer
        if here.any():
            g_in[batch[here], targets.pos[here]] += targets.vec[here]
        g = g + _ln_adjoint(g_in, lay.ln2_scale, w2, centre=centre2)
        # attention: resid_mid = resid_pre + sum_h (A_h v_h) W_O[h], v_h = ln1(resid_pre) W_V[h]
        attn = block.attn
        g_z = torch.einsum("bnd,hed->bnhe", g, attn.W_O.detach())
        g_v = torch.zeros_like(g_z)
        for q_rows, pattern in frozen.attention_blocks(layer, query_block):
            if g_z[:, q_rows].any():  # targets early in the prompt leave later queries without gradient
                g_v[:, : q_rows.stop] += torch.einsum("hqk,bqhe->bkhe", pattern, g_z[:, q_rows])
        w1, centre1 = _norm_parts(block.ln1)
        if split is not None and head_edges is not None:
            e_row, e_col = head_edges
            lower = sources.layer[e_col] < layer
            for h in range(cfg.n_heads):
                emit = _ln_adjoint(g_v[:, :, h] @ attn.W_V[h].detach().T, lay.ln1_scale, w1, centre=centre1)
                at = emit[e_row, sources.pos[e_col]]
                split[:, layer * cfg.n_heads + h] = torch.where(lower, (at * sources.vec[e_col]).sum(-1), 0.0)
        g_ln1 = torch.einsum("bnhe,hde->bnd", g_v, attn.W_V.detach())
        g = g + _ln_adjoint(g_ln1, lay.ln1_scale, w1, centre=centre1)
    contract(g, -1)
    return rows, split


# ---------------------------------------------------------------------------------------------- influence


def normalize_matrix(matrix: Tensor) -> Tensor:
    """circuit-tracer's: absolute values, each row divided by its sum."""
    normalized = matrix.abs()
    return normalized / normalized.sum(dim=1, keepdim=True).clamp(min=1e-10)


def _influence(normalized: Tensor, row_weights: Tensor, row_of_col: Tensor, max_iter: int = 1000) -> Tensor:
    """circuit-tracer's `compute_influence` (`w A + w A^2 + ...`) on the rectangular matrix: `[n_cols]` total influence
    of each source column on the weighted rows; `row_of_col[c]` the row of column `c` (-1: none)."""
    has_row = row_of_col >= 0
    current = row_weights @ normalized
    influence = current.clone()
    for _ in range(max_iter):
        carried = torch.zeros(normalized.shape[0])
        carried[row_of_col[has_row]] = current[has_row]
        if not carried.any():
            return influence
        current = carried @ normalized
        influence += current
    raise CircuitError(f"influence did not converge in {max_iter} iterations: the graph has a cycle")


def _find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """circuit-tracer's `find_threshold`: the score above which `threshold` of the total lies."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    return ordered[min(int(torch.searchsorted(cumulative, threshold)), len(ordered) - 1)]


def _row_weights(graph: AttributionGraph) -> Tensor:
    weights = torch.zeros(graph.adjacency.shape[0])
    weights[graph.n_features :] = graph.logit_probs
    return weights


def _row_of_col(graph: AttributionGraph) -> Tensor:
    row_of_col = torch.full((graph.adjacency.shape[1],), -1, dtype=torch.long)
    row_of_col[: graph.n_features] = torch.arange(graph.n_features)
    return row_of_col


def node_influence(graph: AttributionGraph, adjacency: Tensor | None = None) -> Tensor:
    """`[n_nodes]` each node's influence on the logits (the logits' own: their probabilities), circuit-tracer's
    `compute_node_influence`."""
    a = graph.adjacency if adjacency is None else adjacency
    cols = _influence(normalize_matrix(a), _row_weights(graph), _row_of_col(graph))
    return torch.cat([cols, torch.zeros(len(graph.logit_tokens))])


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """Replacement and completeness scores, circuit-tracer's `compute_graph_scores` (on the rows it has: error and
    token nodes have no inputs, so their non-error fraction is 1, as in circuit-tracer's square matrix)."""
    normalized = normalize_matrix(graph.adjacency)
    influence = node_influence(graph)
    (e0, e1), (t0, t1) = _bounds(graph)["error"], _bounds(graph)["token"]
    token_inf, error_inf = float(influence[t0:t1].sum()), float(influence[e0:e1].sum())
    replacement = token_inf / max(token_inf + error_inf, 1e-30)
    non_error = torch.ones(graph.n_nodes)
    row_nodes = torch.cat([torch.arange(graph.n_features), torch.arange(t1, graph.n_nodes)])
    non_error[row_nodes] = 1 - normalized[:, e0:e1].sum(1)
    output = influence.clone()
    output[t1:] += graph.logit_probs
    return GraphScores(replacement, float((non_error * output).sum() / output.sum()))


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
    """Set `graph.node_mask` and `graph.edge_mask` as circuit-tracer's `prune_graph` does (tokens and logits always
    kept; then latents and errors without kept outgoing edges, and latents without kept incoming ones, dropped until
    nothing changes); returns the graph."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must lie in [0, 1], got {value}")
    f = graph.n_features
    t0 = _bounds(graph)["token"][0]
    influence = node_influence(graph)
    node_mask = influence >= _find_threshold(influence, node_threshold)
    node_mask[t0:] = True
    row_nodes = torch.cat([torch.arange(f), torch.arange(graph.n_nodes - len(graph.logit_tokens), graph.n_nodes)])
    pruned = graph.adjacency.clone()
    pruned[~node_mask[row_nodes]] = 0
    pruned[:, ~node_mask[: pruned.shape[1]]] = 0
    normalized = normalize_matrix(pruned)
    row_inf = _influence(normalized, _row_weights(graph), _row_of_col(graph))[:f]
    row_total = torch.cat([row_inf, torch.zeros(len(graph.logit_tokens))]) + _row_weights(graph)
    scores = normalized * row_total[:, None]
    edge_mask = scores >= _find_threshold(scores, edge_threshold)
    edge_mask &= scores > 0
    old = torch.zeros_like(node_mask)
    while not torch.equal(old, node_mask):
        old = node_mask.clone()
        edge_mask[~node_mask[row_nodes]] = False
        edge_mask[:, ~node_mask[: pruned.shape[1]]] = False
        node_mask[:t0] &= edge_mask[:, :t0].any(0)  # latents and errors need a kept outgoing edge
        node_mask[:f] &= edge_mask[:f].any(1)  # latents need a kept incoming edge
    graph.node_mask, graph.edge_mask = node_mask, edge_mask
    return graph


# ---------------------------------------------------------------------------------------------- building


def estimate_memory_mb(model: Any, n_pos: int, n_active: int, cfg: GraphConfig) -> float:
    """The MiB a graph of `n_pos` positions with `n_active` active latents needs beyond the model: the cached prompt
    state (queries, keys, inputs, errors per layer, the source vectors), the edge matrix (visited latents and logits x
    sources, and its normalised copy while ranking), one backward batch's gradients and temporaries, one block of
    attention pattern, and the clean forward pass's attention scores and pattern (one layer, batch 1: the only term in
    `n_pos` squared, and transient). Linear in `n_pos` for a fixed `max_feature_nodes` apart from that last term."""
    mc = model.cfg
    n_rows = min(cfg.max_feature_nodes or n_active, n_active) + cfg.max_n_logits
    n_cols = n_active + (mc.n_layers + 1) * n_pos
    cache = mc.n_layers * n_pos * (2 * mc.n_heads * mc.d_head + 3 * mc.d_model) + n_cols * (mc.d_model + 3)
    edges = 2 * n_rows * n_cols
    batch = cfg.batch_size * (n_pos * (4 * mc.d_model + 3 * mc.n_heads * mc.d_head) + 2 * CONTRACT_BLOCK * mc.d_model)
    pattern = 3 * mc.n_heads * min(cfg.query_block, n_pos) * n_pos
    forward = 2 * mc.n_heads * n_pos**2
    return (cache + edges + batch + pattern + forward) * FLOAT_BYTES / 2**20


def _sources(frozen: _Frozen, keep: Tensor) -> _Sources:
    """Source columns: the latents in `keep` (indices into the active ones), errors (layer-major), tokens."""
    idx, val = frozen.active.index[keep], frozen.active.value[keep]
    n, n_layers = frozen.n_pos, frozen.cfg.n_layers
    dec = torch.zeros(len(idx), frozen.cfg.d_model)
    for layer, tc in frozen.transcoders.items():
        at = idx[:, 0] == layer
        dec[at] = tc.W_dec.detach().float()[idx[at, 2]] * val[at, None]
    errors = torch.cat([lay.error for lay in frozen.layers])
    return _Sources(
        pos=torch.cat([idx[:, 1], torch.arange(n).repeat(n_layers), torch.arange(n)]),
        layer=torch.cat([idx[:, 0], torch.arange(n_layers).repeat_interleave(n), torch.full((n,), -1)]),
        vec=torch.cat([dec, errors, frozen.token_vecs.float()]),
    )


def _latent_targets(frozen: _Frozen, which: Tensor) -> _Targets:
    return _encoder_targets(frozen, frozen.active.index[which])


def _encoder_targets(frozen: _Frozen, idx: Tensor) -> _Targets:
    """Targets reading the encoder column of each (layer, position, latent) of `idx`."""
    vec = torch.zeros(len(idx), frozen.cfg.d_model)
    for layer, tc in frozen.transcoders.items():
        at = idx[:, 0] == layer
        vec[at] = tc.W_enc.detach().float().T[idx[at, 2]]
    return _Targets(idx[:, 0], idx[:, 1], vec)


def by_layer(transcoders: Mapping[int, SAE] | Sequence[SAE]) -> dict[int, SAE]:
    """Transcoders keyed by the layer whose MLP they replace (a sequence: one per layer, in order)."""
    return dict(enumerate(transcoders)) if isinstance(transcoders, Sequence) else dict(transcoders)


def attribute(
    model: Any, transcoders: Mapping[int, SAE] | Sequence[SAE], tokens: Tensor, cfg: GraphConfig | None = None
) -> AttributionGraph:
    """The attribution graph of the prompt `tokens` (`[n_pos]` ids) for a TransformerLens decoder whose layer `L`'s
    MLP is replaced by `transcoders[L]` (reads `blocks.L.hook_mlp_in`, writes `blocks.L.hook_mlp_out`), pruned by
    `cfg`'s thresholds, with the head split of its kept edges. `CircuitError` before anything runs when the memory
    estimate exceeds `cfg.memory_budget_mb`."""
    cfg = cfg or GraphConfig()
    tcs = by_layer(transcoders)
    _check(model, tcs)
    tokens = tokens.reshape(-1).cpu()
    if len(tokens) > model.cfg.n_ctx:
        raise ConfigError(f"the prompt has {len(tokens)} tokens but the model's context is {model.cfg.n_ctx}")
    floor = estimate_memory_mb(model, len(tokens), 0, cfg)  # no latent active: the least it can need
    if floor > cfg.memory_budget_mb:
        _refuse(floor, len(tokens), None, cfg)
    with torch.no_grad():
        frozen = _Frozen(model, tcs, tokens)
    n_active = len(frozen.active.value)
    estimate = estimate_memory_mb(model, len(tokens), n_active, cfg)
    if estimate > cfg.memory_budget_mb:
        _refuse(estimate, len(tokens), n_active, cfg)
    with torch.no_grad():
        return _attribute(frozen, tokens, cfg)


def _refuse(estimate: float, n_pos: int, n_active: int | None, cfg: GraphConfig) -> NoReturn:
    active = "at least" if n_active is None else f"{n_active} active latents,"
    raise CircuitError(
        f"this graph needs about {estimate:.0f} MiB ({n_pos} positions, {active} up to "
        f"{cfg.max_feature_nodes or 'all'} latents visited, batch {cfg.batch_size}), over the budget of "
        f"{cfg.memory_budget_mb:.0f} MiB (GraphConfig.memory_budget_mb); nothing was computed. Give a smaller "
        "max_feature_nodes, batch_size or query_block, a shorter prompt, or a larger budget"
    )


def _attribute(frozen: _Frozen, tokens: Tensor, cfg: GraphConfig) -> AttributionGraph:
    model = frozen.model
    n_layers, n = model.cfg.n_layers, len(tokens)
    n_active = len(frozen.active.value)
    probs = frozen.logits.softmax(-1)
    top_p, top_idx = probs.topk(min(cfg.max_n_logits, len(probs)))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), cfg.desired_logit_prob)) + 1
    top_p, top_idx = top_p[:cutoff], top_idx[:cutoff]
    w_u = model.W_U.detach().float()
    logit_vecs = (w_u[:, top_idx] - w_u.mean(1, keepdim=True)).T
    n_logits = len(top_idx)
    sources = _sources(frozen, torch.arange(n_active))
    n_cols = len(sources.pos)
    max_rows = min(cfg.max_feature_nodes or n_active, n_active)
    edges = torch.zeros(max_rows + n_logits, n_cols)
    row_node = torch.zeros(max_rows + n_logits, dtype=torch.long)  # row -> active latent (or n_active + logit)
    qb = cfg.query_block
    for start in range(0, n_logits, cfg.batch_size):
        sl = slice(start, min(start + cfg.batch_size, n_logits))
        k = sl.stop - sl.start
        t = _Targets(torch.full((k,), n_layers), torch.full((k,), n - 1), logit_vecs[sl])
        edges[sl] = _backward(frozen, t, sources, query_block=qb)[0]
        row_node[sl] = n_active + torch.arange(sl.start, sl.stop)
    filled, visited = n_logits, torch.zeros(n_active, dtype=torch.bool)
    while filled - n_logits < max_rows:
        if max_rows == n_active:
            pending = torch.arange(n_active)
        else:
            norm = normalize_matrix(edges[:filled])
            weights = torch.zeros(filled)
            weights[:n_logits] = top_p
            row_of_col = torch.full((n_cols,), -1, dtype=torch.long)
            latent_rows = row_node[n_logits:filled]
            row_of_col[latent_rows] = torch.arange(n_logits, filled)
            influence = _influence(norm, weights, row_of_col)[:n_active]
            rank = influence.argsort(descending=True)
            pending = rank[~visited[rank]][: min(cfg.update_interval * cfg.batch_size, max_rows - filled + n_logits)]
        for batch in pending.split(cfg.batch_size):
            rows, _ = _backward(frozen, _latent_targets(frozen, batch), sources, query_block=qb)
            edges[filled : filled + len(batch)] = rows
            row_node[filled : filled + len(batch)] = batch
            visited[batch] = True
            filled += len(batch)
    # reorder: latent rows by active index, then logits; keep only the visited latents' columns
    chosen = visited.nonzero()[:, 0]
    order = torch.cat([torch.argsort(row_node[n_logits:]) + n_logits, torch.arange(n_logits)])
    cols = torch.cat([chosen, torch.arange(n_active, n_cols)])
    adjacency = edges[order][:, cols]
    graph = AttributionGraph(
        tokens=tokens,
        latents=frozen.active.index[chosen],
        activations=frozen.active.value[chosen],
        logit_tokens=top_idx,
        logit_probs=top_p,
        adjacency=adjacency,
        n_layers=n_layers,
        node_mask=torch.ones(len(chosen) + (n_layers + 1) * n + n_logits, dtype=torch.bool),
        edge_mask=adjacency != 0,
        head_names=[f"L{layer}.H{h}" for layer in range(n_layers) for h in range(model.cfg.n_heads)] + ["resid"],
        head_split=torch.zeros(0, n_layers * model.cfg.n_heads + 1),
    )
    prune(graph, cfg.node_threshold, cfg.edge_threshold)
    graph.head_split = _head_split(frozen, graph, _sources(frozen, chosen), logit_vecs, cfg)
    return graph


def _head_split(
    frozen: _Frozen, graph: AttributionGraph, sources: _Sources, logit_vecs: Tensor, cfg: GraphConfig
) -> Tensor:
    """Each kept edge split over the heads it passes through lowest, then the rest (`AttributionGraph.head_split`)."""
    kept = graph.edge_mask.nonzero()
    out = torch.zeros(len(kept), len(graph.head_names))
    f, n_layers = graph.n_features, graph.n_layers
    target_rows = kept[:, 0].unique()
    for batch in target_rows.split(cfg.batch_size):
        is_logit = batch >= f
        latent_t = _encoder_targets(frozen, graph.latents[batch[~is_logit]])
        layer = torch.full((len(batch),), n_layers)
        pos = torch.full((len(batch),), graph.n_pos - 1)
        enc = torch.zeros(len(batch), frozen.cfg.d_model)
        layer[~is_logit], pos[~is_logit], enc[~is_logit] = latent_t.layer, latent_t.pos, latent_t.vec
        enc[is_logit] = logit_vecs[batch[is_logit] - f]
        which = torch.isin(kept[:, 0], batch).nonzero()[:, 0]
        local = torch.searchsorted(batch, kept[which, 0])
        _, split = _backward(
            frozen, _Targets(layer, pos, enc), sources, query_block=cfg.query_block, head_edges=(local, kept[which, 1])
        )
        assert split is not None
        out[which, :-1] = split
        out[which, -1] = graph.adjacency[kept[which, 0], kept[which, 1]] - split.sum(1)
    return out


class PathStep(NamedTuple):
    """One node of a path through a graph."""

    node: int
    """The node's index."""
    label: str
    """Its `AttributionGraph.node_label`."""


def top_path(graph: AttributionGraph, logit: int = 0) -> list[PathStep]:
    """The path from a token node to the `logit`-th logit node along kept edges that maximises the product of the
    edges' normalised absolute weights (each target's inputs summing to 1), source first."""
    normalized = normalize_matrix(graph.adjacency * graph.edge_mask)
    f = graph.n_features
    best = torch.zeros(graph.adjacency.shape[1])  # best product from each source column up to the logit
    nxt = torch.full((graph.adjacency.shape[1],), -1, dtype=torch.long)
    logit_row = f + logit
    best_rows = torch.zeros(graph.adjacency.shape[0])
    best_rows[logit_row] = 1.0
    order = sorted(range(f), key=lambda i: -int(graph.latents[i, 0]))  # latents from the top layer down
    for row in [logit_row, *order]:
        if row < f:
            best_rows[row] = best[row]
        scores = normalized[row] * best_rows[row]
        better = scores > best
        best[better], nxt[better] = scores[better], row
    t0, t1 = _bounds(graph)["token"]
    start = t0 + int(best[t0:t1].argmax())
    path, node = [start], start
    while True:
        row = int(nxt[node])
        if row < 0:
            break
        node = row if row < f else graph.n_nodes - len(graph.logit_tokens) + row - f
        path.append(node)
        if row >= f:
            break
    return [PathStep(i, graph.node_label(i)) for i in path]
