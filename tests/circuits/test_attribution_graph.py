"""Attribution graphs over transcoders: the known path of the hand-built MLP toy, replacement and completeness
scores, edges that reproduce the frozen replacement model's ablation effects, the head split, the memory budget."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saelab.circuits.attribution_graph import (
    AttributionGraph,
    GraphConfig,
    _Frozen,
    attribute,
    estimate_memory_mb,
    graph_scores,
    top_path,
)
from saelab.errors import CircuitError, ConfigError
from saelab.toys.attribution import KNOWN_HEAD, mlp_graph_toy
from tests.conftest import exact_transcoder


@pytest.fixture(scope="module")
def toy_graph():
    toy = mlp_graph_toy(n_pos=10, a_pos=3, noise=0.01)  # near-exact: its error nodes carry a little
    return toy, attribute(toy.model, toy.transcoders, toy.tokens)


def test_the_toys_top_path_is_the_known_one_and_its_replacement_score_is_high(toy_graph):
    toy, graph = toy_graph
    assert [step.label for step in top_path(graph)] == toy.path
    scores = graph_scores(graph)
    assert 0.9 <= scores.replacement < 0.999
    assert 0.9 <= scores.completeness <= 1.0
    kept = {graph.node_label(i) for i in graph.node_mask.nonzero()[:, 0].tolist()}
    assert set(toy.path) <= kept


def test_the_known_edge_goes_through_the_known_head(toy_graph):
    toy, graph = toy_graph
    labels = [graph.node_label(i) for i in range(graph.n_nodes)]
    src, dst = labels.index(toy.path[1]), labels.index(toy.path[2])
    row = graph.row_of(dst)
    kept = graph.edge_mask.nonzero().tolist()
    split = graph.head_split[kept.index([row, src])]
    head = graph.head_names.index(f"L{KNOWN_HEAD[0]}.H{KNOWN_HEAD[1]}")
    torch.testing.assert_close(split.sum(), graph.adjacency[row, src], atol=1e-5, rtol=1e-5)
    assert split[head] / split.abs().sum() > 0.99


def test_scores_fall_as_the_transcoders_error_grows():
    noisy = [mlp_graph_toy(noise=noise) for noise in (0.0, 0.1, 0.5)]
    scores = [graph_scores(attribute(t.model, t.transcoders, t.tokens)) for t in noisy]
    assert scores[0].replacement == pytest.approx(1.0, abs=1e-6)  # exact transcoders: no error nodes carry anything
    assert scores[0].replacement > scores[1].replacement > scores[2].replacement
    assert scores[2].replacement < 0.9
    assert scores[0].completeness > scores[2].completeness


def ln_decoder(*, normalization: str, positions: str) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=40, n_ctx=32, act_fn="relu",
        normalization_type=normalization, positional_embedding_type=positions, seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, move_to_device=False).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", "ln_final.w")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "b_in" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def noisy_transcoder(model, layer):
    tc = exact_transcoder(model, layer)
    with torch.no_grad():
        tc.W_dec += 0.05 * torch.randn_like(tc.W_dec)  # so the error nodes are not zero
    return tc


def ablated(model, tcs, tokens, graph: AttributionGraph, *, vec_layer: int, pos: int, vec: torch.Tensor):
    """Every target's value (latent pre-activations, demeaned logits) when `vec` is removed at `pos` of
    `blocks.{vec_layer}.hook_mlp_out` (`hook_embed` for -1), with patterns, scales and the other MLP outputs frozen at
    their clean values: the local replacement model's ablation."""
    _, clean = model.run_with_cache(
        tokens[None], names_filter=lambda n: n.endswith(("hook_pattern", "hook_scale", "hook_mlp_out"))
    )
    values: dict[str, torch.Tensor] = {}

    def freeze(act, hook):
        return clean[hook.name]

    def remove(act, hook):
        act = clean[hook.name].clone() if "mlp_out" in hook.name else act.clone()
        act[0, pos] -= vec
        return act

    def keep(act, hook):
        values[hook.name] = act[0]

    hooks = [(n, freeze) for n in clean.keys()]
    target = "hook_embed" if vec_layer < 0 else f"blocks.{vec_layer}.hook_mlp_out"
    hooks = [h for h in hooks if h[0] != target] + [(target, remove)]
    read = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks + [(n, keep) for n in read])[0, -1]
    out = torch.zeros(graph.adjacency.shape[0])
    for row in range(graph.n_features):
        layer, p, latent = graph.latents[row].tolist()
        ln2 = model.blocks[layer].ln2
        tc_in = values[read[layer]] * ln2.w + getattr(ln2, "b", 0.0)  # saelab's hook_mlp_in: after ln2's w and b
        out[row] = tc_in[p] @ tcs[layer].W_enc.detach()[:, latent]
    out[graph.n_features :] = (logits - logits.mean())[graph.logit_tokens]
    return out


@pytest.mark.parametrize(("normalization", "positions"), [("LN", "standard"), ("RMS", "rotary")])
def test_edges_reproduce_the_replacement_models_ablation_effects(normalization, positions):
    model = ln_decoder(normalization=normalization, positions=positions)
    tcs = [noisy_transcoder(model, layer) for layer in range(2)]
    tokens = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(3))
    graph = attribute(model, tcs, tokens, GraphConfig(max_n_logits=3, desired_logit_prob=0.99))
    base = ablated(model, tcs, tokens, graph, vec_layer=-1, pos=0, vec=torch.zeros(model.cfg.d_model))
    f = graph.n_features
    layer0 = (graph.latents[:, 0] == 0).nonzero()[:, 0]
    sources = [int(layer0[len(layer0) // 2]), int(layer0[-1])]  # two layer-0 latents
    e0 = f + 0 * graph.n_pos  # layer 0's error nodes
    t0 = f + 2 * graph.n_pos
    frozen = _Frozen(model, dict(enumerate(tcs)), tokens)
    checked = 0
    for src in [*sources, e0 + 5, t0 + 4]:
        if src < f:
            layer, pos, latent = graph.latents[src].tolist()
            vec = graph.activations[src] * tcs[layer].W_dec.detach()[latent]
        elif src < t0:
            layer, pos = divmod(src - f, graph.n_pos)
            vec = frozen.layers[layer].error[pos]
        else:
            layer, pos = -1, src - t0
            vec = frozen.token_vecs[pos]
        effect = base - ablated(model, tcs, tokens, graph, vec_layer=layer, pos=pos, vec=vec)
        edges = graph.adjacency[:, src]
        downstream = torch.cat([graph.latents[:, 0] > layer, torch.ones(len(graph.logit_tokens), dtype=torch.bool)])
        torch.testing.assert_close(edges[downstream], effect[downstream], atol=2e-4, rtol=1e-3)
        assert edges[~downstream].abs().sum() < 1e-6  # nothing at or below the source's layer reads it
        checked += int(edges[downstream].abs().gt(1e-3).sum())
    assert checked > 10  # the check compared real edges, not zeros


def test_a_graph_over_the_memory_budget_is_refused_with_its_estimate():
    toy = mlp_graph_toy(n_pos=40)
    cfg = GraphConfig(memory_budget_mb=0.05)
    with pytest.raises(CircuitError, match=r"needs about .* MiB.*budget of 0 MiB") as err:
        attribute(toy.model, toy.transcoders, toy.tokens, cfg)
    assert "memory_budget_mb" in str(err.value)
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in toy.model.hook_dict.values())  # the model is untouched
    graph = attribute(toy.model, toy.transcoders, toy.tokens)  # and works right after
    assert [s.label for s in top_path(graph)] == toy.path


def test_the_memory_estimate_grows_linearly_with_the_prompt_apart_from_the_forward_pass():
    model = mlp_graph_toy().model
    cfg = GraphConfig(max_feature_nodes=256)
    per_token = 8
    forward = lambda n: 2 * model.cfg.n_heads * n**2 * 4 / 2**20  # the clean pass's scores and pattern, batch 1
    est = [estimate_memory_mb(model, n, per_token * n, cfg) - forward(n) for n in (512, 1024, 2048)]
    assert est[2] - est[1] == pytest.approx(2 * (est[1] - est[0]), rel=1e-6)  # affine in the prompt's length
    assert est[2] > 1.5 * est[1]


def test_a_model_without_a_transcoder_for_every_layer_is_refused():
    toy = mlp_graph_toy()
    with pytest.raises(ConfigError, match=r"layers \[1\] have none"):
        attribute(toy.model, {0: toy.transcoders[0]}, toy.tokens)
