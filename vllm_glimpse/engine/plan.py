"""What the runner and the model exchange in a step that prunes.

The runner builds a :class:`GlimpseStepPlan` before the forward: for every request whose prefill
ends in this step and that has images, a :class:`PruneRequest` naming its rows in the batch. The
step computes prompt tokens ``num_computed..P-1`` of it: the first ``num_computed`` came from the
prefix cache (every one before the first image: blocks that hold image tokens are never cached,
:mod:`vllm_glimpse.engine.scheduler`), their K/V already in the paged cache.
The model runs layers 0..K, decides, moves the KV, and records one :class:`PruneResult` per
request; the runner reads them after sampling to shrink the request's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_glimpse.settings import GlimpseSettings

#: Attribute of the step's ``ModelRunnerOutput`` that carries ``{req_id: stats}`` of the requests
#: pruned in it from the worker to the scheduler (it survives pickling between processes).
OUTPUT_ATTR = "glimpse_pruned"


@dataclass(frozen=True)
class ImageSpan:
    """One image of a request: its first token's row in the request's prompt, token count, and
    grid (rows, columns of LLM tokens)."""

    offset: int
    length: int
    grid_hw: tuple[int, int]


@dataclass
class PruneRequest:
    req_id: str
    batch_index: int  # the request's row in the persistent batch (query_start_loc index)
    row_start: int  # its first scheduled token's row in this step's flattened batch
    num_prompt_tokens: int  # the whole prompt, glimpse token included (it is the last one)
    images: list[ImageSpan]
    block_ids: list[int]  # its KV blocks (group 0), in order
    keep_overrides: GlimpseSettings | None = None  # the request's own keep-rule knobs
    num_computed: int = 0  # prompt tokens computed before this step (prefix-cache hits)

    @property
    def token_row0(self) -> int:
        """The row prompt token 0 would have: prompt token i is at row ``token_row0 + i``
        (for i >= num_computed, the tokens this step computes)."""
        return self.row_start - self.num_computed

    @property
    def glimpse_row(self) -> int:
        return self.token_row0 + self.num_prompt_tokens - 1


@dataclass
class PruneResult:
    """Who survived: ``kept_rows`` are rows of the request's prompt (glimpse token excluded)."""

    kept_rows: torch.Tensor  # [P'] int64, ascending, local to the prompt
    num_prompt_tokens: int  # P, glimpse token included
    image_tokens_before: int
    image_tokens_after: int
    kept_per_image: list[int]

    @property
    def num_kept(self) -> int:
        return int(self.kept_rows.numel())


@dataclass
class GlimpseStepPlan:
    """Handed to the model for one forward. ``switch_attention`` is the runner's callback that
    points the given layers at new attention metadata and slot mappings for the survivors."""

    requests: list[PruneRequest]
    block_size: int
    # (layer names, {batch index: rows removed}, survivors' slot mapping, their count, their rows)
    switch_attention: Callable[..., None]
    results: dict[str, PruneResult] = field(default_factory=dict)
