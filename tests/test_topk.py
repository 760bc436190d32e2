"""The CPU top-k kernel selects exactly what torch.topk selects."""

import pytest
import torch

from saelab.topk import topk_rows


def assert_same_selection(pre: torch.Tensor, k: int, width: int | None = None) -> None:
    """Same multiset of values as torch.topk, and every index points at its value."""
    vals, idx = topk_rows(pre, k, width)
    ref, _ = pre[:, : width or pre.shape[1]].topk(k, dim=-1)
    assert vals.shape == idx.shape == (pre.shape[0], k)
    assert (idx < (width or pre.shape[1])).all()
    assert all(len(set(row)) == k for row in idx.tolist())  # k distinct columns per row
    nan = float("inf")  # NaN sorts last with this substitution; torch.topk ranks NaN highest too
    torch.testing.assert_close(vals.nan_to_num(nan).sort(-1).values, ref.nan_to_num(nan).sort(-1).values,
                               rtol=0, atol=0)
    torch.testing.assert_close(pre.gather(1, idx).nan_to_num(nan), vals.nan_to_num(nan), rtol=0, atol=0)


@pytest.mark.parametrize(("rows", "cols", "k", "width"), [
    (300, 6144, 32, None),  # the benchmark's main top-k
    (300, 6144, 192, 3072),  # its AuxK top-k over the dead prefix
    (50, 1000, 7, None),
    (50, 37, 37, None),  # k == width
    (50, 37, 1, 5),
    (3, 100, 99, 100),
])
def test_matches_torch_topk_on_random_rows(rows, cols, k, width):
    pre = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols + k))
    assert_same_selection(pre, k, width)


def test_ties_and_special_values():
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(-3, 3, (40, 777), generator=g).float()
    for k in (1, 50, 700):
        assert_same_selection(ties, k)
    pre = torch.randn(8, 300, generator=g)
    pre[0, 5] = float("nan")
    pre[1, :100] = float("nan")  # more NaNs than k: all selected entries are NaN
    pre[2] = float("-inf")
    pre[3, ::3] = float("inf")
    pre[4] = 1.0
    pre[5] = -0.0
    pre[5, ::2] = 0.0
    pre[6] = -pre[6].abs()  # all negative
    for k in (1, 32, 200):
        assert_same_selection(pre, k)


def test_nan_ranks_highest():
    pre = torch.tensor([[0.0, float("nan"), 5.0, 1.0]])
    vals, idx = topk_rows(pre, 2)
    assert set(idx[0].tolist()) == {1, 2}


def test_other_dtypes_and_layouts_fall_back_to_torch():
    pre = torch.randn(20, 64, dtype=torch.float64)
    assert_same_selection(pre, 5)
    assert_same_selection(torch.randn(64, 20).T, 5)  # not contiguous


@pytest.mark.parametrize(("k", "width"), [(0, None), (5, 4), (2, 65)])
def test_bad_k_or_width_is_an_error(k, width):
    with pytest.raises(ValueError, match="top-k needs"):
        topk_rows(torch.randn(3, 64), k, width)
