"""Where the scheduler learns a request's new length (vLLM 0.32 V1 ``Scheduler``).

The worker reports, with the step's output, every request it pruned: P prompt tokens (glimpse
token included) became P' survivors. In the same ``update_from_output`` call the scheduler

* shrinks the request: prompt = the survivors' ids, ``num_computed_tokens -= P - P'`` (so the
  next step decodes at index P'), its images marked consumed;
* returns the tail KV blocks to the pool: the request keeps ``cdiv(P', block_size)`` blocks,
  exactly the ones the worker keeps in its block table;
* attaches the request's pruning stats to its output of that step (``kv_transfer_params
  ["vllm_glimpse"]``, :mod:`vllm_glimpse.stats`) and logs them.

Prefix caching: a request's blocks are offered to vLLM's prefix cache only up to its first image
(whole blocks before it). From there on a pruned request's blocks hold compacted K/V, which
depend on the question and on the pruned tokens, so they are never cached under any hash;
blocks before the first image are never moved by the prune. So text-only requests cache and hit
as in vanilla vLLM, and a request with images hits the blocks before its first image (a shared
system prompt, an earlier turn of the conversation).

Preemption: a pruned request cannot be recomputed from its survivors (their K/V depend on the
pruned tokens in layers 0..K). When vLLM preempts one, its original prompt comes back (the
tokens it already generated are kept); on resumption the first step computes only the prompt,
prunes again (the sampled token is discarded as for a partial prefill), and the generated
tokens follow as a chunk over the short cache, as in the original run.
"""

from __future__ import annotations

import logging

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_glimpse.engine.plan import OUTPUT_ATTR
from vllm_glimpse.settings import LOGGER_NAME
from vllm_glimpse.stats import STATS_KEY, pruning_stats, visionzip_request_stats

logger = logging.getLogger(LOGGER_NAME)


class PruningStatsMixin:
    """Sends each request's pruning stats to the front end with its first output once they are
    known (the front end keeps them for the request: :mod:`vllm_glimpse.stats`). VisionZip's are
    known when the request is admitted; GlimpsePrune's in the step that prunes it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending_stats: dict[str, dict] = {}

    def add_request(self, request) -> None:
        super().add_request(request)
        stats = visionzip_request_stats(request)
        if stats is not None:
            self.pending_stats[request.request_id] = stats

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.pending_stats:
            for engine_outputs in outputs.values():
                for out in engine_outputs.outputs:
                    stats = self.pending_stats.pop(out.request_id, None)
                    if stats is not None:
                        out.kv_transfer_params = {**(out.kv_transfer_params or {}), STATS_KEY: stats}
            for req_id in [r for r in self.pending_stats if r not in self.requests]:
                del self.pending_stats[req_id]  # finished without an output
        return outputs

    def finish_requests(self, request_ids, *args, **kwargs):
        result = super().finish_requests(request_ids, *args, **kwargs)
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids or [])
        for req_id in ids:
            self.pending_stats.pop(req_id, None)
        return result


class PruningStatsScheduler(PruningStatsMixin, Scheduler):
    """VisionZip engines' scheduler (vLLM's, reporting stats)."""


class PruningStatsAsyncScheduler(PruningStatsMixin, AsyncScheduler):
    """VisionZip engines' scheduler under async scheduling."""


def pruning_stats_scheduler(*, vllm_config, **kwargs):
    """``scheduler_cls`` of VisionZip engines: vLLM's scheduler of the kind the engine resolved
    (async scheduling is settled after the config hook that names the scheduler), with stats."""
    async_ = vllm_config.scheduler_config.async_scheduling
    cls = PruningStatsAsyncScheduler if async_ else PruningStatsScheduler
    return cls(vllm_config=vllm_config, **kwargs)


def _replace_tokens(request, prompt: list[int]) -> None:
    """Set a request's prompt, keeping its generated tokens. ``_all_token_ids`` is changed in
    place (vLLM holds views of it); both are kept of the type vLLM made them (a list in vLLM
    0.32/0.33, an int32 ``TokenBuffer`` in 0.34, which has no slice assignment)."""
    outputs = list(request._output_token_ids)
    request.prompt_token_ids = type(request.prompt_token_ids)(prompt)
    tokens = request._all_token_ids
    del tokens[:]
    tokens.extend(prompt + outputs)
    request.num_prompt_tokens = len(prompt)


class GlimpseScheduler(PruningStatsMixin, Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.glimpse_originals: dict[str, tuple[list[int], list]] = {}
        # Every caller that offers blocks to the prefix cache (allocate_slots, and the KV
        # manager's own cache_blocks) goes through the coordinator's cache_blocks.
        coordinator = self.kv_cache_manager.coordinator
        cache_blocks = coordinator.cache_blocks

        def cache_blocks_before_images(request, num_computed_tokens: int, *args, **kwargs):
            limit = min(num_computed_tokens, self.cacheable_tokens(request))
            return cache_blocks(request, limit, *args, **kwargs)

        coordinator.cache_blocks = cache_blocks_before_images

    def cacheable_tokens(self, request) -> int:
        """How many of a request's first tokens may be offered to the prefix cache: those before
        its first image (the blocks from there on are compacted when it prunes), all of them for
        a request without images."""
        original = self.glimpse_originals.get(request.request_id)
        features = original[1] if original is not None else request.mm_features
        offsets = [f.mm_position.offset for f in features or () if f.modality == "image"]
        return min(offsets) if offsets else request.num_tokens

    # ---- scheduling: a request's prompt step ends at its glimpse token -----------------------

    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs):
        # A request recomputed after preemption holds its prompt and its generated tokens: the
        # prompt (ending in the glimpse token) must be a step of its own, pruned before the
        # generated tokens are computed over the short cache.
        if num_computed_tokens < request.num_prompt_tokens:
            num_new_tokens = min(num_new_tokens, request.num_prompt_tokens - num_computed_tokens)
        return super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, num_new_tokens, *args, **kwargs)

    # ---- after a step: the new lengths ---------------------------------------------------------

    def update_from_output(self, scheduler_output, model_runner_output):
        pruned = getattr(model_runner_output, OUTPUT_ATTR, None) or {}
        for req_id, stats in pruned.items():
            public = pruning_stats(
                "glimpse", stats["image_tokens_per_image_before"],
                stats["image_tokens_per_image_after"], stats["prompt_tokens_before"],
                stats["prompt_tokens_after"])
            self.pending_stats[req_id] = public  # sent with this step's outputs
            logger.info(
                "vllm-glimpse: request %s kept %d of %d image tokens (prompt %d -> %d tokens)",
                req_id, public["image_tokens_after"],
                public["image_tokens_before"], public["prompt_tokens_before"],
                public["prompt_tokens_after"])
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id, stats in pruned.items():
            request = self.requests.get(req_id)
            if request is not None and not request.is_finished():
                self._shrink_request(request, stats)
        return outputs

    def _shrink_request(self, request, stats: dict) -> None:
        kept_ids = list(stats["kept_prompt_token_ids"])
        before = request.num_prompt_tokens
        self.glimpse_originals[request.request_id] = (list(request.prompt_token_ids), request.mm_features)
        _replace_tokens(request, kept_ids)
        request.num_computed_tokens -= before - len(kept_ids)
        # Positions continue from the original ones, so the request may not outgrow the length
        # the unpruned one could reach (max_model_len, the model's position range): cap its
        # output where vLLM would have stopped the unpruned request (prompt without the glimpse).
        limit = self.max_model_len - (before - 1)
        if request.max_tokens > limit:
            request.max_tokens = limit
        # Its images were computed in the step that pruned it (and their encoder outputs freed
        # by update_from_output): nothing left to schedule for them.
        request.mm_features = []
        self._free_tail_blocks(request.request_id, len(kept_ids))

    def _free_tail_blocks(self, req_id: str, num_tokens: int) -> None:
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            blocks = manager.req_to_blocks.get(req_id)
            if not blocks:
                continue
            keep = cdiv(num_tokens, manager.block_size)
            tail = blocks[keep:]
            del blocks[keep:]
            # The manager counts how many of the request's blocks it has already offered to the
            # prefix cache; it must not point past the blocks the request still holds.
            if req_id in manager.num_cached_block:
                manager.num_cached_block[req_id] = min(manager.num_cached_block[req_id], keep)
            manager.block_pool.free_blocks(reversed(tail))

    # ---- preemption and the end of a request ---------------------------------------------------

    def _preempt_request(self, request, timestamp, *args, **kwargs) -> None:
        super()._preempt_request(request, timestamp, *args, **kwargs)
        original = self.glimpse_originals.pop(request.request_id, None)
        if original is not None:
            prompt, mm_features = original
            _replace_tokens(request, prompt)
            request.mm_features = mm_features

    def _free_request(self, request, *args, **kwargs):
        self.glimpse_originals.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)
