"""What the runner and the model exchange in a step that prunes.

The runner builds a :class:`GlimpseStepPlan` before the forward:

* for every request with images whose prompt ends in this step, a :class:`PruneRequest` naming
  its rows in the batch. The step computes prompt tokens ``num_computed..P-1`` of it. Of the
  tokens computed before: those before the first image came from the prefix cache (blocks that
  hold image tokens are never cached, :mod:`vllm_glimpse.engine.scheduler`) or from earlier
  chunks, and ran every layer; the last ``num_deferred`` (from the first image on) came from
  earlier chunks of a chunked prefill and ran layers 0..K only (:class:`DeferRequest`);
* for every request with images whose prompt does not end in this step but whose chunk reaches
  its first image, a :class:`DeferRequest`: its rows from the first image on run layers 0..K and
  wait, their layer-K state held by the model, for the step that computes the glimpse token.
  Layers K+1.. of every token after the first image depend on the keep decision, which needs the
  glimpse token (the prompt's last).

The model runs layers 0..K, decides, moves the KV, and records one :class:`PruneResult` per
request; the runner reads them after sampling to shrink the request's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
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
    num_computed: int = 0  # prompt tokens computed before this step

    @property
    def num_deferred(self) -> int:
        """The last of the tokens computed before, from the first image on: earlier chunks ran
        them through layer K only."""
        return max(0, self.num_computed - self.images[0].offset) if self.images else 0

    @property
    def token_row0(self) -> int:
        """The row prompt token 0 would have: prompt token i is at row ``token_row0 + i``
        (for i >= num_computed, the tokens this step computes)."""
        return self.row_start - self.num_computed

    @property
    def glimpse_row(self) -> int:
        return self.token_row0 + self.num_prompt_tokens - 1


@dataclass
class DeferRequest:
    """A chunk of a prompt with images that reaches its first image but not the glimpse token:
    tokens ``first_deferred..num_computed + num_scheduled - 1`` (rows ``deferred_rows``) run
    layers 0..K only and are held by the model until the step that prunes the request."""

    req_id: str
    batch_index: int
    row_start: int  # the chunk's first token's row in this step's flattened batch
    num_computed: int  # prompt tokens computed before this step
    num_scheduled: int  # tokens of the chunk
    first_image: int  # the first image token's index in the prompt
    images: list[ImageSpan]

    @property
    def first_deferred(self) -> int:
        return max(self.num_computed, self.first_image)

    @property
    def deferred_rows(self) -> range:
        return range(self.row_start + self.first_deferred - self.num_computed,
                     self.row_start + self.num_scheduled)

    @property
    def lengths_after_k(self) -> tuple[int, int]:
        """(query length, sequence length) of the request in layers K+1..: the chunk's tokens
        before the first image, over the tokens before it."""
        end = min(self.num_computed + self.num_scheduled, self.first_image)
        return max(0, end - self.num_computed), end


def step_role(num_computed: int, num_scheduled: int, num_prompt_tokens: int,
              first_image: int) -> str | None:
    """What a step does with a request that has images, from the tokens it schedules: None for
    a chunk before its first image (an ordinary prefill), ``"defer"`` for a chunk that reaches
    an image but not the prompt's end (a :class:`DeferRequest`), ``"prune"`` for the step that
    ends the prompt (a :class:`PruneRequest`)."""
    end = num_computed + num_scheduled
    if end <= first_image:
        return None
    return "defer" if end < num_prompt_tokens else "prune"


def image_token_mask(images: list[ImageSpan], first_token: int, count: int) -> np.ndarray:
    """Which of prompt tokens ``first_token..first_token + count - 1`` are image tokens."""
    tokens = np.arange(first_token, first_token + count)
    mask = np.zeros(count, dtype=bool)
    for image in images:
        mask |= (tokens >= image.offset) & (tokens < image.offset + image.length)
    return mask


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
    # (layer names, {batch index: (query length, sequence length)} of the requests whose lengths
    # change, the survivors' slot mapping, their count, their 1-D token positions)
    switch_attention: Callable[..., None]
    deferred: list[DeferRequest] = field(default_factory=list)
    results: dict[str, PruneResult] = field(default_factory=dict)
