"""A transcoder trained on a MiniLM store has, in its `metrics.json`, the pooled sentence-embedding cosine with the
MLP replaced by it (beside its FVU), and it beats the zero-ablation baseline; an SAE on the MLP's output has the
cosine with its reconstruction in place of that output, against the same baseline (the MLP's output zeroed). After
60 steps the SAE does not beat it yet (measured: 0.926 against 0.936): the known answers of the SAE's splice are in
`test_embedding_metrics.py`."""

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
