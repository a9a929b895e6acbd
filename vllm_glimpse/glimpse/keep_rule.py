"""GlimpsePrune's keep rule: which image tokens of one sample survive, given the VIP's logits.

Source: GitHub HVision-NKU/GlimpsePrune, transformers_gp/models/qwen2_5_vl/model_gp.py,
``_apply_token_constraints`` (newest version, commit 7da5669; it added ``fixed_remain_ratio`` and
the ``max(1, ...)`` clamps) called by ``_get_remain_masks`` once per *sample* over all of the
sample's image tokens (``_try_parse_as_by_batch``), on ``sigmoid(logits[-1])`` (the last VIP
output row). The first release (commit dafaa38, also llava_gp/.../llava_llama.py
``_get_remain_masks``) has the same threshold / max-ratio / min-number steps without the clamps,
plus optional ``anchor_positions`` (always keep the image's corner tokens) applied last.

Order, exactly as the authors:

1. ``fixed_remain_ratio`` r set: keep the top ``k = clamp(int(r * N), 1, N)``; nothing else applies.
2. keep where ``sigmoid(logit) > threshold`` (strict).
3. ``max_remain_ratio`` r set and ``kept / N > r``: keep the top ``clamp(int(r * N), 1, N)`` instead.
4. ``min_remain_num`` m set and ``kept < m``: additionally keep the top ``clamp(m, 1, N)``.
5. (first release only) ``anchor_positions``: force the named corners of the image grid.

Where we are stricter than the authors: they rank with ``torch.topk`` on probabilities computed
in the VIP's dtype (bf16 in their runs), whose order among equal values is unspecified; we rank
by the float32 logit with ties broken towards the lower token index (a stable sort), which
agrees with theirs wherever theirs is determined. The threshold test uses a float32 sigmoid.
NaN logits are an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ANCHOR_NAMES", "KeepRule", "keep_mask"]

#: Corner names of the first release's ``anchor_positions``.
ANCHOR_NAMES = ("tl", "tr", "bl", "br")


def _anchor_index(name: str, h: int, w: int) -> int:
    return {"tl": 0, "tr": w - 1, "bl": (h - 1) * w, "br": h * w - 1}[name]


def keep_mask(
    logits: torch.Tensor,
    *,
    threshold: float = 0.5,
    max_remain_ratio: float | None = None,
    min_remain_num: int | None = 1,
    fixed_remain_ratio: float | None = None,
    anchor_positions: Sequence[str] = (),
    grid_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bool keep mask ``[N]`` for one sample's image-token logits ``[N]`` (all its images).

    Defaults are the authors' (threshold 0.5, min_remain_num 1, no ratio). ``grid_hw`` (rows,
    columns, in merged tokens) is needed only for ``anchor_positions`` and then the sample must
    hold exactly one image of h*w == N tokens.
    """
    x = logits.detach().reshape(-1).to(torch.float32)
    n = x.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=logits.device)
    if bool(torch.isnan(x).any()):
        raise ValueError("GlimpsePrune keep rule: the VIP produced NaN logits")

    order: torch.Tensor | None = None

    def top(k: int) -> torch.Tensor:
        nonlocal order
        if order is None:  # descending, stable: equal logits keep index order (lower first)
            order = torch.sort(x, descending=True, stable=True).indices
        m = torch.zeros(n, dtype=torch.bool, device=x.device)
        m[order[:k]] = True
        return m

    if fixed_remain_ratio is not None:
        mask = top(min(n, max(1, int(float(fixed_remain_ratio) * n))))
    else:
        mask = torch.sigmoid(x) > threshold
        if max_remain_ratio is not None:
            kept = int(mask.sum())
            if kept / n > max_remain_ratio:
                mask = top(min(n, max(1, int(max_remain_ratio * n))))
        if min_remain_num is not None:
            kept = int(mask.sum())
            if kept < min_remain_num:
                mask |= top(min(n, max(1, int(min_remain_num))))

    if anchor_positions:
        if grid_hw is None:
            raise ValueError("anchor_positions need the image grid (grid_hw) of a single-image sample")
        h, w = int(grid_hw[0]), int(grid_hw[1])
        if h * w != n:
            raise ValueError(
                f"anchor_positions need a single-image sample: grid {h}x{w} = {h * w} tokens, "
                f"but the sample has {n}"
            )
        for name in anchor_positions:
            if name not in ANCHOR_NAMES:
                raise ValueError(f"unknown anchor position {name!r} (supported: {', '.join(ANCHOR_NAMES)})")
            mask[_anchor_index(name, h, w)] = True
    return mask


@dataclass(frozen=True)
class KeepRule:
    """The keep-rule settings of one configuration; call it on one sample's logits."""

    threshold: float = 0.5
    max_remain_ratio: float | None = None
    min_remain_num: int | None = 1
    fixed_remain_ratio: float | None = None
    anchor_positions: tuple[str, ...] = ()

    def __call__(self, logits: torch.Tensor, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        return keep_mask(
            logits,
            threshold=self.threshold,
            max_remain_ratio=self.max_remain_ratio,
            min_remain_num=self.min_remain_num,
            fixed_remain_ratio=self.fixed_remain_ratio,
            anchor_positions=self.anchor_positions,
            grid_hw=grid_hw,
        )
