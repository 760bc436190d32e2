"""Sparse feature circuits on a model whose circuit is known: a two-layer attention-only decoder trained until it
does induction (a previous-token head in layer 0 feeding an induction head in layer 1), with a TopK SAE on each
layer's attn.hook_z (the `induction_run` fixture)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saelab.circuits import (
    INDUCTION_HOOKS,
    Circuit,
    CircuitError,
    Prompt,
    _encode,
    _output,
    aggregate,
    edge_effects,
    exact_patching,
    faithfulness_curve,
    find_circuit,
    induction_accuracy,
    induction_task,
    node_effects,
    prompt_task,
    repeated_tokens,
)
from saelab.cli import app as cli
from saelab.models import capture, load_model, resolve_hooks
from saelab.sae import SAE, SAEConfig

L0, L1 = INDUCTION_HOOKS
LENGTH = 10
POS = 15  # the metric reads the middle of the repeated half: its token first occurred at POS - LENGTH ...
SOURCE = (
    POS - LENGTH + 1
)  # ... so induction attends to the position after that, whose previous token is the current one


@pytest.fixture(scope="module")
def model(induction_run):
    return load_model(str(induction_run / "model"), device="cpu")


def sae_folder(run, hook):
    (folder,) = (run / "saes" / hook).iterdir()
    return folder


@pytest.fixture(scope="module")
def saes(induction_run):
    return {h: SAE.load(sae_folder(induction_run, h)).eval() for h in INDUCTION_HOOKS}


@pytest.fixture(scope="module")
def task(model):
    return induction_task(model, n=8, length=LENGTH, position=POS)


@pytest.fixture(scope="module")
def ig(model, saes, task):
    return node_effects(model, saes, task, "ig", ig_steps=10, baseline="patch", progress=False)


@pytest.fixture(scope="module")
def circuit(model, saes, task, induction_run):
    return find_circuit(
        model, saes, task, sae_paths={h: str(sae_folder(induction_run, h)) for h in INDUCTION_HOOKS}, progress=False
    )


def spliced(model, saes, tokens):
    """The model's logits with every SAE spliced in as dec(enc(x)) + err."""

    def splice(sae):
        def edit(x):
            nodes = _encode(sae, x)
            return sae.decode(nodes.f) + nodes.err

        return edit

    with torch.no_grad():
        return _output(model, tokens, {h: splice(s) for h, s in saes.items()})


def corr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def eta2(values: torch.Tensor, groups: torch.Tensor) -> float:
    """The fraction of the variance of `values` explained by the group (token) they belong to."""
    values, groups = values.flatten().double(), groups.flatten()
    sums = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, values)
    means = sums / torch.bincount(groups).clamp_min(1)
    return float(1 - ((values - means[groups]) ** 2).sum() / ((values - values.mean()) ** 2).sum())


# ------------------------------------------------------------------------------------------- the model


def test_the_model_does_induction_with_a_previous_token_head(model):
    assert induction_accuracy(model, LENGTH) > 0.9
    tokens = repeated_tokens(64, LENGTH, seed=5)
    _, cache = model.run_with_cache(tokens)
    previous = cache["blocks.0.attn.hook_pattern"][:, 0].diagonal(-1, dim1=-2, dim2=-1).mean()
    second = torch.arange(LENGTH + 1, 2 * LENGTH + 1)
    induction = cache["blocks.1.attn.hook_pattern"][:, 0, second[:-1], second[:-1] - LENGTH + 1].mean()
    assert previous > 0.5 and induction > 0.7, (float(previous), float(induction))


def test_splicing_the_saes_leaves_the_output_unchanged(model, saes, task):
    with torch.no_grad():
        plain = model(task.tokens)
    torch.testing.assert_close(spliced(model, saes, task.tokens), plain, atol=1e-4, rtol=1e-4)
    # and so keeping every node is the whole model: faithfulness 1, completeness 0
    shapes = {h: (task.tokens.shape[1], s.cfg.d_sae + 1) for h, s in saes.items()}
    every = [(h, p, i) for h, (n_pos, n) in shapes.items() for p in range(n_pos) for i in range(n)]
    curve = faithfulness_curve(model, saes, task, every, [len(every)])
    assert curve["faithfulness"][0] == pytest.approx(1, abs=1e-4)
    assert curve["completeness"][0] == pytest.approx(0, abs=1e-4)


# ---------------------------------------------------------------------------------------- node effects


@pytest.mark.parametrize("baseline", ["patch", "zero", "mean"])
def test_attribution_patching_is_exact_where_the_metric_is_linear(model, saes, task, baseline):
    """The logit is linear in layer 1's hook_z (no LayerNorm, no later layer), so one gradient is exact there."""
    last = {L1: saes[L1]}
    atp = node_effects(model, last, task, "atp", baseline=baseline, progress=False)
    exact = exact_patching(model, last, task, baseline, progress=False)
    assert exact[L1].abs().max() > 0.5
    torch.testing.assert_close(aggregate(atp.effects[L1], "none"), exact[L1], atol=2e-3, rtol=1e-3)


def test_integrated_gradients_add_up_to_patching_the_whole_hook_point(model, saes, task, ig):
    """Completeness of integrated gradients: a hook point's node effects sum to the effect of patching it all."""
    with torch.no_grad():
        clean = task.metric(model(task.tokens))
        patched = capture(model, task.patch, resolve_hooks(model, INDUCTION_HOOKS))
        for hook in INDUCTION_HOOKS:
            moved = task.metric(_output(model, task.tokens, {hook: lambda x, a=patched[hook]: a})) - clean
            summed = ig.effects[hook].sum((1, 2))
            assert moved.abs().mean() > 1
            torch.testing.assert_close(summed, moved, atol=0.05, rtol=0.02)


def test_integrated_gradients_agree_with_exact_patching(model, saes, task, ig):
    exact = exact_patching(model, saes, task, "patch", progress=False)
    ig_all = torch.cat([aggregate(ig.effects[h], "none").flatten() for h in INDUCTION_HOOKS])
    exact_all = torch.cat([exact[h].flatten() for h in INDUCTION_HOOKS])
    moved = (ig_all != 0) | (exact_all != 0)
    assert moved.sum() > 100
    r = corr(ig_all[moved], exact_all[moved])
    assert r >= 0.9, f"integrated gradients against exact patching: r = {r:.3f}"


# ----------------------------------------------------------------------------------------- the circuit


def test_the_circuit_is_the_induction_circuit(model, saes, circuit):
    """Layer-1 latents at the metric's position, fed by layer-0 previous-token latents at the position after the
    earlier occurrence of the current token; a few nodes recover the behaviour."""
    top = circuit.nodes[:5]
    assert all((n.hook, n.position) in ((L1, POS), (L0, SOURCE)) for n in top), top
    heads = [n for n in circuit.nodes if n.hook == L1 and n.latent != "err"][:3]
    assert circuit.nodes.index(heads[0]) < 3 and all(n.position == POS for n in heads)
    sources = []
    for node in heads:
        incoming = sorted((e for e in circuit.edges if e.dst == node.key), key=lambda e: -abs(e.weight))
        assert incoming, f"no edges into {node.key}"
        src = next(n for n in circuit.nodes if n.key == incoming[0].src)
        assert (src.hook, src.position) == (L0, SOURCE) and src.latent != "err", incoming[:3]
        sources.append(src.latent)
    # those layer-0 latents read the previous token: on fresh sequences it explains their activation
    tokens = repeated_tokens(512, LENGTH, seed=99)
    f = capture(model, tokens, resolve_hooks(model, [L0]))[L0]
    with torch.no_grad():
        acts = saes[L0].encode(f)[:, 1:]
    for latent in set(sources):
        previous, current = eta2(acts[..., latent], tokens[:, :-1]), eta2(acts[..., latent], tokens[:, 1:])
        assert previous > 0.5 and previous > 3 * current, (latent, previous, current)
    curve = circuit.curves
    small = min(n for n, f in zip(curve["n"], curve["faithfulness"]) if f >= 0.8)
    assert small <= 32 and curve["completeness"][curve["n"].index(small)] < 0.3, curve


def test_edges_are_the_direct_jacobian_times_the_upstream_change(model, saes, task, ig):
    """At the clean input, edge(u -> d) = grad_d * (d d / d u) * delta_u: check it against finite differences,
    moving one layer-0 node a small step towards its patch value and reading the layer-1 latent."""
    latent = int(aggregate(ig.effects[L1], "none")[POS, :-1].abs().argmax())
    error = saes[L0].cfg.d_sae
    ups = [(SOURCE, int(i)) for i in aggregate(ig.effects[L0], "none")[SOURCE, :-1].abs().topk(3).indices] + [
        (SOURCE, error)
    ]
    weights = edge_effects(model, saes, task, ig, L0, L1, ups, [(POS, latent)], steps=1)[0]
    clean, delta, grad = ig.clean[L0], ig.deltas[L0], ig.grads[L1].f[:, POS, latent]

    def latent_after(f, err):
        read = {}
        with torch.no_grad():
            _output(model, task.tokens, {L0: lambda x: saes[L0].decode(f) + err, L1: lambda x: read.setdefault("x", x)})
            return saes[L1].encode(read["x"])[:, POS, latent]

    eps = 1e-2
    base = latent_after(clean.f, clean.err)
    for (p, i), weight in zip(ups, weights.tolist()):
        f, err = clean.f.clone(), clean.err.clone()
        if i == error:
            err[:, p] += eps * delta.err[:, p]
        else:
            f[:, p, i] += eps * delta.f[:, p, i]
        finite = float(((latent_after(f, err) - base) / eps * grad).mean())
        assert weight == pytest.approx(finite, rel=0.05, abs=1e-3), (p, i)
    assert weights.abs().max() > 0.05


def test_aggregating_over_positions_sums_the_effects(model, saes, task, ig):
    summed = find_circuit(model, saes, task, aggregation="sum", curve_sizes=[1, 4, 16], progress=False)
    assert summed.nodes and all(n.position is None for n in summed.nodes)
    per_latent = {h: aggregate(ig.effects[h], "none").sum(0) for h in INDUCTION_HOOKS}
    for n in summed.nodes[:10]:
        index = saes[n.hook].cfg.d_sae if n.latent == "err" else n.latent
        assert n.effect == pytest.approx(float(per_latent[n.hook][index]), rel=1e-4, abs=1e-5)
    assert summed.edges and summed.curves["n"] == [1, 4, 16]


def test_a_circuit_survives_a_json_round_trip(circuit, tmp_path):
    path = circuit.save(tmp_path / "c.json")
    assert Circuit.load(path) == circuit
    assert json.loads(path.read_text())["nodes"][0]["hook"] in INDUCTION_HOOKS
    with pytest.raises(CircuitError, match="saelab circuit"):
        Circuit.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- prompts


def test_prompt_tasks_on_the_induction_model(model, saes):
    """Prompts in the model's own alphabet: `...Qz7...Q` should continue with `z`, unless the first part is patched."""
    prompts = [
        Prompt(clean="Qz7bKDmQ", patch="aX7bKDmQ", target="z", distractor="X"),
        Prompt(clean="Hr2cYwpH", patch="Jf2cYwpH", target="r", distractor="f"),
    ]
    task = prompt_task(model, prompts, "logit_diff")
    with torch.no_grad():
        clean, patched = task.metric(model(task.tokens)), task.metric(model(task.patch))
    assert (clean > 2).all() and (patched < clean - 2).all()
    found = find_circuit(model, saes, task, progress=False)
    last = task.tokens.shape[1] - 1
    assert found.labels[-1] == "Q"
    assert next(n for n in found.nodes if n.hook == L1).position == last
    with pytest.raises(CircuitError, match="same length"):
        prompt_task(model, [Prompt(clean="Qz7bQ", target="z"), Prompt(clean="Qz7Q", target="z")], "logit")
    with pytest.raises(CircuitError, match="exactly one token"):
        prompt_task(model, [Prompt(clean="Qz7bQ", target="z7")], "logit")
    with pytest.raises(CircuitError, match="similarity"):
        prompt_task(model, [Prompt(clean="Qz7bQ", target="z")], "similarity")
    with pytest.raises(CircuitError, match="patch input"):
        node_effects(model, saes, prompt_task(model, [Prompt(clean="Qz7bQ", target="z")], "logit"), progress=False)


def test_encoders_get_a_similarity_metric_and_exact_splicing(minilm):
    """MiniLM: the metric is the cosine similarity of the pooled output embedding to a reference text's."""
    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(d_in=384, d_sae=768, k=16)).eval()
    prompts = [Prompt(clean="the cat sat on the mat", patch="a dog ran in the park", target="a cat on a mat")]
    task = prompt_task(minilm, prompts, "similarity")
    with torch.no_grad():
        clean = task.metric(_output(minilm, task.tokens, {}))
        assert clean.item() > task.metric(_output(minilm, task.patch, {})).item()
    ig = node_effects(minilm, {hook: sae}, task, "ig", ig_steps=16, baseline="patch", progress=False)
    with torch.no_grad():
        patched = capture(minilm, task.patch, resolve_hooks(minilm, [hook]))[hook]
        moved = task.metric(_output(minilm, task.tokens, {hook: lambda x: patched})) - clean
    assert abs(float(moved)) > 0.05
    assert float(ig.effects[hook].sum()) == pytest.approx(float(moved), rel=0.03)


# -------------------------------------------------------------------------------------------------- CLI


def write_config(path, run, **changes):
    cfg = {
        "name": "cli",
        "out": str(run),
        "model": str(run / "model"),
        "saes": {h: str(sae_folder(run, h)) for h in INDUCTION_HOOKS},
        "data": {"task": "induction", "examples": 8, "length": LENGTH},
        "curve_sizes": [4, 16, 64],
    } | changes
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_cli_writes_the_circuit_into_the_run(induction_run, tmp_path):
    result = CliRunner().invoke(
        cli, ["circuit", str(write_config(tmp_path / "c.yaml", induction_run)), "-q", "--set", "method=atp"]
    )
    assert result.exit_code == 0, result.output
    assert "faithfulness by node count" in result.output
    saved = Circuit.load(induction_run / "circuits" / "cli.json")
    assert saved.nodes and saved.config["method"] == "atp" and saved.curves["n"] == [4, 16, 64]
    assert saved.saes[L1] == str(sae_folder(induction_run, L1))


def test_cli_reads_prompts_from_a_file(induction_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(p)
            for p in [
                {"clean": "Qz7bKDmQ", "patch": "aX7bKDmQ", "target": "z", "distractor": "X"},
                {"clean": "Hr2cYwpH", "patch": "Jf2cYwpH", "target": "r", "distractor": "f"},
            ]
        )
    )
    config = write_config(
        tmp_path / "c.yaml",
        induction_run,
        name="cli-prompts",
        metric="logit_diff",
        data={"task": "prompts", "file": str(prompts)},
    )
    result = CliRunner().invoke(cli, ["circuit", str(config), "-q"])
    assert result.exit_code == 0, result.output
    saved = Circuit.load(induction_run / "circuits" / "cli-prompts.json")
    assert saved.labels == ["<s>", *"Qz7bKDmQ"] and saved.metric["clean"] > saved.metric["patch"] + 2
    prompts.write_text(prompts.read_text().replace('"clean"', '"cleen"', 1))
    result = CliRunner().invoke(cli, ["circuit", str(config), "-q"])
    assert result.exit_code == 2 and "line 1 is not a prompt" in result.output, result.output


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"saes": {L0: "/nonexistent/sae"}}, "no SAE folder"),
        ({"metric": "logit_diff"}, "use metric logit or loss"),
        ({"nodes": 3}, "unknown key `nodes`"),
        ({"model": "/nonexistent/model"}, "holds neither"),
        ({"data": {"task": "induction", "length": 40}}, "needs 81 positions"),
        ({"data": {"task": "prompts"}}, "give either `prompts`"),
    ],
)
def test_cli_refuses_bad_configs_with_the_fix(induction_run, tmp_path, changes, message):
    result = CliRunner().invoke(
        cli, ["circuit", str(write_config(tmp_path / "c.yaml", induction_run, **changes)), "-q"]
    )
    assert result.exit_code == 2
    assert message in result.output
