"""A transcoder trained on a MiniLM store has, in its `metrics.json`, the pooled sentence-embedding cosine with the
MLP replaced by it (beside its FVU), and it beats the zero-ablation baseline."""

from __future__ import annotations

import json

import pytest

from saelab.config import HarvestConfig
from saelab.harvest import harvest
from saelab.models import HOOK_KINDS
from saelab.train import TrainConfig, train

MLP_IN, MLP_OUT = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"


@pytest.mark.skipif("hook_mlp_in" not in HOOK_KINDS, reason="harvests do not record blocks.L.hook_mlp_in yet")
def test_transcoder_metrics_json_has_the_embedding_cosine(minilm, tmp_path):
    store = str(tmp_path / "mlp.zarr")
    cfg = dict(model="minilm", hooks=[MLP_IN, MLP_OUT], out=store, context_length=64, batch_size=32)
    harvest(HarvestConfig.model_validate(cfg | dict(max_tokens=8192, device="cpu")), model=minilm, progress=False)
    train_cfg = dict(store=store, run=str(tmp_path / "run"), tokens=512 * 60, batch_size=512, eval_rows=2048)
    train_cfg |= dict(transcoders=[{"input": MLP_IN, "output": MLP_OUT}], ce_contexts=8, device="cpu")
    (result,) = train(TrainConfig.model_validate(train_cfg | {"grid": {"k": [16], "expansion": [4]}}), progress=False)
    metrics = json.loads((result.path / "metrics.json").read_text())
    assert result.embedding is not None and metrics["embedding_cos"] == result.embedding["embedding_cos"]
    assert metrics["fvu"] < 0.8  # 60 steps
    assert metrics["embedding_cos_zero"] < metrics["embedding_cos"] <= 1.0, metrics
