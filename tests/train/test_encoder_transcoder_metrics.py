"""A transcoder trained on a MiniLM store has, in its `metrics.json`, the pooled sentence-embedding cosine with the
MLP replaced by it (beside its FVU), and it beats the zero-ablation baseline; an SAE on the MLP's output has the
cosine with its reconstruction in place of that output, against the same baseline (the MLP's output zeroed). After
60 steps the SAE does not beat it yet (measured: 0.926 against 0.936): the known answers of the SAE's splice are in
`test_embedding_metrics.py`. The same dictionaries of the tuned arrays of a store of two models (MiniLM twice) get
the same cosines from their alias's model."""

from __future__ import annotations

import json

import pytest

from saelab.config import HarvestConfig
from saelab.harvest import harvest
from saelab.train import TrainConfig, train

MLP_IN, MLP_OUT = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"


def test_transcoder_and_sae_metrics_json_have_the_embedding_cosine(minilm, tmp_path):
    store = str(tmp_path / "mlp.zarr")
    cfg = dict(model="minilm", hooks=[MLP_IN, MLP_OUT], out=store, context_length=64, batch_size=32)
    harvest(HarvestConfig.model_validate(cfg | dict(max_tokens=8192, device="cpu")), model=minilm, progress=False)
    train_cfg = dict(store=store, run=str(tmp_path / "run"), tokens=512 * 60, batch_size=512, eval_rows=2048)
    train_cfg |= dict(transcoders=[{"input": MLP_IN, "output": MLP_OUT}], ce_contexts=8, device="cpu")
    train_cfg |= dict(hooks=[MLP_OUT], grid={"k": [16], "expansion": [4]})
    results = {r.hook: r for r in train(TrainConfig.model_validate(train_cfg), progress=False)}
    sae, transcoder = results[MLP_OUT], results[MLP_IN]  # a transcoder is filed under the hook it reads
    rows = [json.loads((r.path / "metrics.json").read_text()) for r in (sae, transcoder)]
    for result, metrics in zip((sae, transcoder), rows, strict=True):
        assert result.embedding is not None and metrics["embedding_cos"] == result.embedding["embedding_cos"]
        assert metrics["fvu"] < 0.8  # 60 steps
        assert 0.5 < metrics["embedding_cos"] <= 1.0, metrics
    assert rows[1]["embedding_cos_zero"] < rows[1]["embedding_cos"], rows[1]
    assert rows[0]["embedding_cos_zero"] == pytest.approx(rows[1]["embedding_cos_zero"], abs=1e-6)


def test_the_tuned_arrays_of_a_two_model_store_are_evaluated_on_their_own_model(minilm, tmp_path):
    """MiniLM harvested twice (`models: {base: minilm, tuned: minilm}`): the SAE and the transcoder of `tuned/...`
    arrays get the embedding cosine from the alias's model at its own hook points, the very numbers of the same
    dictionaries trained on a store of MiniLM alone (the arrays, the batches and the seeds are the same)."""
    common = dict(hooks=[MLP_IN, MLP_OUT], context_length=32, batch_size=32, max_tokens=3072, device="cpu")
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    harvest(HarvestConfig.model_validate(common | dict(model="minilm", out=one)), model=minilm, progress=False)
    both = HarvestConfig.model_validate(common | dict(models={"base": "minilm", "tuned": "minilm"}, out=two))
    harvest(both, model={"base": minilm, "tuned": minilm}, progress=False)
    rows = []
    for store, prefix in ((one, ""), (two, "tuned/")):
        train_cfg = dict(store=store, run=str(tmp_path / f"run-{bool(prefix)}"), tokens=256 * 8, batch_size=256)
        train_cfg |= dict(transcoders=[{"input": prefix + MLP_IN, "output": prefix + MLP_OUT}], eval_rows=1024)
        train_cfg |= dict(hooks=[prefix + MLP_OUT], grid={"k": [8], "expansion": [1]}, ce_contexts=2, device="cpu")
        rows.append([r.embedding for r in train(TrainConfig.model_validate(train_cfg), progress=False)])
    assert all(e is not None for e in rows[0] + rows[1])
    for alone, tuned in zip(*rows, strict=True):
        assert tuned == pytest.approx(alone, rel=1e-5)
