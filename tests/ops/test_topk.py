"""The CPU top-k kernel selects exactly what torch.topk selects."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from saelab.ops.topk import topk_rows

INF = float("inf")


def assert_same_selection(pre, k, cols=None) -> None:
    """Same multiset of values as torch.topk over the selectable columns, k distinct columns
    per row, and every index pointing at its value."""
    vals, idx = topk_rows(pre, k, cols)
    cols = torch.arange(pre.shape[1]) if cols is None else cols
    ref, _ = pre[:, cols].topk(k, dim=-1)
    assert vals.shape == idx.shape == (pre.shape[0], k)
    assert all(len(set(row)) == k for row in idx.tolist())
    assert torch.isin(idx, cols).all()
    # NaN -> inf keeps NaN ranked highest, as torch.topk ranks it, and makes values comparable.
    torch.testing.assert_close(
        vals.nan_to_num(INF).sort(-1).values, ref.nan_to_num(INF).sort(-1).values, rtol=0, atol=0
    )
    torch.testing.assert_close(pre.gather(1, idx).nan_to_num(INF), vals.nan_to_num(INF), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("rows", "cols", "k"), [(300, 6144, 32), (300, 6144, 192), (50, 1000, 7), (50, 37, 37), (50, 37, 1), (3, 100, 99)]
)
@pytest.mark.parametrize("subset", [False, True])
def test_matches_torch_topk_on_random_rows(rows, cols, k, subset):
    g = torch.Generator().manual_seed(cols + k)
    pre = torch.randn(rows, cols, generator=g)
    chosen = None
    if subset:  # about half the columns, at least k of them, in no particular order
        mask = torch.rand(cols, generator=g) < 0.5
        mask[torch.randperm(cols, generator=g)[:k]] = True
        chosen = mask.nonzero().squeeze(1)
        chosen = chosen[torch.randperm(len(chosen), generator=g)]
    assert_same_selection(pre, k, chosen)


def test_ties_and_special_values():
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(-3, 3, (40, 777), generator=g).float()
    for k in (1, 50, 700):
        assert_same_selection(ties, k)
    pre = torch.randn(8, 300, generator=g)
    pre[0, 5] = float("nan")
    pre[1, :100] = float("nan")  # more NaNs than k: all selected entries are NaN
    pre[2] = -INF
    pre[3, ::3] = INF
    pre[4] = 1.0
    pre[5] = -0.0
    pre[5, ::2] = 0.0
    pre[6] = -pre[6].abs()  # all negative
    for k in (1, 32, 200):
        assert_same_selection(pre, k)


def test_columns_outside_the_subset_never_selected():
    pre = torch.full((2, 64), -INF)
    pre[:, ::2] = 5.0  # outside the subset below, so only the -inf columns may be chosen
    _, idx = topk_rows(pre, 32, torch.arange(1, 64, 2))
    assert set(idx.flatten().tolist()) == set(range(1, 64, 2))


def test_nan_ranks_highest():
    vals, idx = topk_rows(torch.tensor([[0.0, float("nan"), 5.0, 1.0]]), 2)
    assert set(idx[0].tolist()) == {1, 2}


def test_other_dtypes_and_layouts_fall_back_to_torch():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(20, 64, dtype=torch.float64, generator=g)
    assert_same_selection(pre, 5)
    assert_same_selection(pre, 5, torch.arange(0, 64, 3))
    assert_same_selection(torch.randn(64, 20, generator=g).T, 5)  # not contiguous


@pytest.mark.parametrize(("k", "n_selectable"), [(0, 64), (65, 64), (3, 2)])
def test_bad_k_is_an_error(k, n_selectable):
    with pytest.raises(ValueError, match="top-k needs"):
        topk_rows(torch.randn(3, 64), k, torch.arange(n_selectable))


def test_columns_out_of_range_are_an_error():
    with pytest.raises(ValueError, match="cols must index"):
        topk_rows(torch.randn(3, 64), 2, torch.tensor([0, 64]))


def test_values_carry_gradients_like_torch_topk():
    pre = torch.randn(5, 300, generator=torch.Generator().manual_seed(2), requires_grad=True)
    vals, idx = topk_rows(pre, 7)
    (vals * torch.arange(7.0)).sum().backward()
    assert pre.grad is not None
    expected = torch.zeros(5, 300).scatter(1, idx, torch.arange(7.0).expand(5, -1))
    assert torch.equal(pre.grad, expected)


def test_the_first_kernel_call_leaves_torchs_thread_count_alone():
    """numba's first parallel launch resets OpenMP's thread count; `topk_rows` must give torch its own back (a
    fresh process: the launch happens once per process)."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from saelab.ops.topk import topk_rows\n"
        "topk_rows(torch.randn(64, 256), 8)\n"
        "print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
