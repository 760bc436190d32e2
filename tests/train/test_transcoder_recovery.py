"""Known answers for transcoders trained from a store: on a synthetic MLP (`saelab.toys.transcoders`) whose output is
a sparse linear function of sparse input features, a transcoder's encoder columns and decoder rows recover the input
and output directions, and a skip transcoder's `W_skip` recovers the dense linear part no sparse code explains."""

from __future__ import annotations

import pytest
import torch

from saelab.dictionaries import SAE
from saelab.importer import import_arrays
from saelab.toys.synthetic import recovery
from saelab.toys.transcoders import make_synthetic_mlp
from saelab.train import TrainConfig, train

PAIR = {"input": "blocks.0.hook_mlp_in", "output": "blocks.0.hook_mlp_out"}


def _trained(tmp_path, *, linear_scale: float, dense: float, skip: bool):
    """The synthetic MLP (32 orthonormal input features in 32 dimensions, outputs in 24, about 3 active) and a TopK
    transcoder (k 4, 64 latents) trained on 1,500 batches of 256 of its rows through the trainer."""
    mlp = make_synthetic_mlp(n_features=32, d_in=32, d_out=24, orthogonal=True, linear_scale=linear_scale, dense=dense)
    rows = mlp.sample(40_000, torch.Generator().manual_seed(0))
    store = str(tmp_path / "store.zarr")
    import_arrays({PAIR["input"]: rows.x, PAIR["output"]: rows.y}, store, progress=False)
    cfg = TrainConfig.model_validate(
        {
            "run": str(tmp_path / "run"),
            "store": store,
            "transcoders": [PAIR | {"skip": skip}],
            "grid": {"k": [4], "expansion": [2], "lr": [5e-3]},
            "tokens": 1500 * 256,
            "batch_size": 256,
            "eval_rows": 2048,
            "warmup_steps": 5,
        }
    )
    (result,) = train(cfg, progress=False)
    return mlp, result, SAE.load(result.path)


def test_a_transcoder_recovers_the_input_and_output_directions(tmp_path):
    mlp, result, tc = _trained(tmp_path, linear_scale=0.0, dense=0.0, skip=False)
    assert result.reconstruction is not None and result.reconstruction["fvu"] < 0.1  # measured 0.048
    assert recovery(mlp.inputs, tc.W_enc.detach().T) >= 0.9  # encoder columns; measured 1.0
    assert recovery(mlp.outputs, tc.W_dec.detach()) >= 0.9  # decoder rows; measured 1.0
    random = torch.nn.functional.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    assert recovery(mlp.inputs, random) == 0.0  # the bar is not met by chance


def test_a_skip_transcoder_recovers_the_linear_part_in_w_skip(tmp_path):
    """The output adds a dense linear map of the input (`linear`), and the input a Gaussian part that no sparse code
    explains: only `W_skip` can carry the map on it."""
    mlp, result, tc = _trained(tmp_path, linear_scale=1.0, dense=0.3, skip=True)
    assert mlp.linear is not None and tc.W_skip is not None
    assert tc.W_skip.shape == mlp.linear.shape
    cos = torch.nn.functional.cosine_similarity(tc.W_skip.detach().flatten(), mlp.linear.flatten(), dim=0)
    assert cos >= 0.9  # measured 0.947
    assert float(tc.W_skip.detach().norm() / mlp.linear.norm()) == pytest.approx(1.0, abs=0.25)
    assert recovery(mlp.outputs, tc.W_dec.detach()) >= 0.75  # the sparse part still in the latents; measured 0.875
