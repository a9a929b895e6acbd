"""GlimpsePrune keep rule (authors' ``_apply_token_constraints``): threshold, max-ratio cap,
min-number top-up, fixed ratio, their order and rounding; deterministic ties."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_glimpse.glimpse import KeepRule, keep_mask


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def L(*probs) -> torch.Tensor:
    return torch.tensor([logit(p) for p in probs])


def idx(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_threshold_is_strict_on_the_sigmoid():
    x = torch.tensor([-1.0, 0.0, 1e-3, 2.0, -3.0])
    assert idx(keep_mask(x)) == [2, 3]  # sigmoid(0) = 0.5 is not > 0.5
    assert idx(keep_mask(x, threshold=0.2)) == [0, 1, 2, 3]
    assert idx(keep_mask(L(0.3, 0.7, 0.9), threshold=0.8)) == [2]


def test_all_below_threshold_tops_up_to_min_keep():
    x = L(0.1, 0.3, 0.2, 0.05, 0.25)
    assert idx(keep_mask(x)) == [1]  # default min_remain_num 1: the best token
    assert idx(keep_mask(x, min_remain_num=3)) == [1, 2, 4]
    assert idx(keep_mask(x, min_remain_num=None)) == []
    assert idx(keep_mask(x, min_remain_num=0)) == []
    assert idx(keep_mask(x, min_remain_num=99)) == [0, 1, 2, 3, 4]  # clamped to N


def test_top_up_adds_to_the_survivors():
    x = L(0.9, 0.1, 0.4, 0.45)
    assert idx(keep_mask(x, min_remain_num=3)) == [0, 2, 3]
    assert idx(keep_mask(x, min_remain_num=1)) == [0]  # already enough


def test_all_above_threshold_capped_by_max_ratio():
    x = torch.linspace(1.0, 3.0, 10)  # all kept by the threshold, increasing
    assert idx(keep_mask(x, max_remain_ratio=0.35)) == [7, 8, 9]  # int(0.35 * 10) = 3
    assert idx(keep_mask(x, max_remain_ratio=1.0)) == list(range(10))


def test_max_ratio_applies_only_when_the_kept_share_exceeds_it():
    x = torch.tensor([3.0, 2.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0])
    assert idx(keep_mask(x, max_remain_ratio=0.2)) == [0, 1]  # 2/10 is not > 0.2
    assert idx(keep_mask(x, max_remain_ratio=0.15)) == [0]  # 2/10 > 0.15 -> top int(1.5) = 1
    # rounding down, and at least one (authors' max(1, ...) clamp)
    assert idx(keep_mask(x, max_remain_ratio=0.05, min_remain_num=None)) == [0]


def test_the_111_percent_budget():
    n = 1000
    x = torch.arange(n, dtype=torch.float32) / n + 1.0  # all above threshold
    kept = keep_mask(x, max_remain_ratio=0.111)
    assert int(kept.sum()) == int(0.111 * n) == 111
    assert idx(kept) == list(range(n - 111, n))


def test_min_keep_after_max_ratio():
    x = torch.linspace(1.0, 2.0, 10)
    # cap to int(0.1 * 10) = 1, then min_remain_num 3 tops back up to the best 3
    assert idx(keep_mask(x, max_remain_ratio=0.1, min_remain_num=3)) == [7, 8, 9]


def test_fixed_ratio_is_plain_top_k_and_ignores_the_rest():
    x = torch.tensor([0.5, -4.0, 3.0, 2.0, -1.0, 9.0, 0.0])
    assert idx(keep_mask(x, fixed_remain_ratio=0.3)) == [2, 5]  # int(2.1) = 2
    mask = keep_mask(x, fixed_remain_ratio=0.3, threshold=0.99, max_remain_ratio=0.01,
                     min_remain_num=5)
    assert idx(mask) == [2, 5]
    assert idx(keep_mask(x, fixed_remain_ratio=0.01)) == [5]  # at least one
    assert idx(keep_mask(x, fixed_remain_ratio=1.0)) == list(range(7))
    assert idx(keep_mask(-torch.ones(4) * 10, fixed_remain_ratio=0.5)) == [0, 1]  # below threshold too


def test_ties_go_to_the_lower_index():
    x = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    assert idx(keep_mask(x, max_remain_ratio=0.34)) == [1, 2]  # int(2.04) = 2 of the four 2.0s
    assert idx(keep_mask(torch.zeros(6), min_remain_num=2)) == [0, 1]
    assert idx(keep_mask(torch.full((6,), 40.0), fixed_remain_ratio=0.5)) == [0, 1, 2]
    # saturated sigmoids (equal in bf16/fp32 probabilities) still rank by logit
    assert idx(keep_mask(torch.tensor([30.0, 40.0, 35.0]), fixed_remain_ratio=0.34)) == [1]


def test_single_token_and_empty():
    assert idx(keep_mask(torch.tensor([-5.0]))) == [0]  # min keep 1
    assert idx(keep_mask(torch.tensor([-5.0]), min_remain_num=None)) == []
    assert idx(keep_mask(torch.tensor([5.0]), max_remain_ratio=0.1)) == [0]  # 1/1 > 0.1, clamp to 1
    assert idx(keep_mask(torch.tensor([-5.0]), fixed_remain_ratio=0.1)) == [0]
    assert keep_mask(torch.zeros(0)).shape == (0,)


def test_dtype_shape_and_nan():
    x = torch.tensor([[0.5, -0.5], [2.0, -2.0]], dtype=torch.bfloat16)
    m = keep_mask(x)
    assert m.dtype == torch.bool and m.shape == (4,) and idx(m) == [0, 2]
    with pytest.raises(ValueError, match="NaN"):
        keep_mask(torch.tensor([1.0, float("nan")]))


def test_anchor_positions_of_the_first_release():
    x = torch.full((6,), -9.0)
    x[4] = 1.0
    m = keep_mask(x, anchor_positions=("tl", "br"), grid_hw=(2, 3))
    assert idx(m) == [0, 4, 5]
    assert idx(keep_mask(x, min_remain_num=None, anchor_positions=("tr", "bl"), grid_hw=(2, 3))) == [2, 3, 4]
    with pytest.raises(ValueError, match="single-image"):
        keep_mask(x, anchor_positions=("tl",), grid_hw=(2, 2))
    with pytest.raises(ValueError, match="need the image grid"):
        keep_mask(x, anchor_positions=("tl",))


def test_rule_object():
    rule = KeepRule(threshold=0.5, max_remain_ratio=0.5, min_remain_num=1)
    assert idx(rule(torch.tensor([3.0, 2.0, 1.0, 0.5]))) == [0, 1]  # 4 survive > 0.5 * 4: top 2
    assert idx(rule(torch.tensor([-3.0, -1.0]))) == [1]  # none survive: the best one
    assert idx(rule(torch.tensor([1.0, -1.0, 1.0]))) == [0]  # 2/3 > 0.5: top int(1.5), tie -> 0
    anchors = KeepRule(min_remain_num=None, anchor_positions=("br",))
    assert idx(anchors(torch.full((4,), -9.0), (2, 2))) == [3]
    assert idx(anchors(torch.full((2,), -9.0), (1, 2))) == [1]
