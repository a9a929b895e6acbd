"""The worker side of GlimpsePrune: plan a step, rebuild attention metadata mid-forward, and
shrink each pruned request's state after the step.

:class:`GlimpseRunnerMixin` is mixed into vLLM 0.32's V1 model runner: ``GPUModelRunner`` in
:mod:`.gpu_runner`, ``CPUModelRunner`` (a subclass of it) in :mod:`.cpu_runner`. This module
imports neither, so that a GPU process never loads vLLM's CPU worker modules (importing
``vllm.v1.worker.cpu_worker`` replaces ``torch.cuda.Event``, ``torch.cuda.Stream`` and the
accelerator memory queries with CPU stand-ins for the whole process).

A request with images whose prompt ends in a step prunes there; with chunked prefill, its
earlier chunks run its image rows through layer K only and the model holds them until then
(:class:`~vllm_glimpse.engine.plan.DeferRequest`).

After a request is pruned from P prompt tokens (glimpse token included) to P' survivors:

* its prompt is the survivors' token ids; its first P' cache slots hold their K/V; its block
  table keeps ``cdiv(P', block_size)`` blocks (the scheduler frees the rest in the same step);
* its images are consumed (``mm_features`` cleared, so no step gathers them again);
* decoding continues at the original positions: token index i of the short sequence has
  position ``i + (P - 1 - P')`` — for Qwen2.5-VL through ``mrope_position_delta``, for LLaVA's
  1-D positions through a per-request offset added to the positions the runner computes.

The original prompt is kept: if the scheduler preempts the request, it is recomputed from it
(the engine scheduler restores the same state on its side, see :mod:`.scheduler`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.forward_context import get_forward_context
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_glimpse.engine.plan import (
    OUTPUT_ATTR,
    DeferRequest,
    GlimpseStepPlan,
    ImageSpan,
    PruneRequest,
    PruneResult,
    step_role,
)
from vllm_glimpse.engine.runner_v2 import prune_step_reservation
from vllm_glimpse.models.common import keep_overrides_of
from vllm_glimpse.settings import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class OriginalRequest:
    """What a pruned request looked like before the step that pruned it."""

    prompt_token_ids: list[int]
    mm_features: list
    mrope_positions: torch.Tensor | None
    mrope_position_delta: int | None


class GlimpseRunnerMixin:
    """Mixed into vLLM's V1 model runner (GPU or CPU)."""

    def _glimpse_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_glimpse_runner_state")
        if state is None:
            state = {"originals": {}, "offsets": {}, "plan": None}
            self.__dict__["_glimpse_runner_state"] = state
        return state

    @property
    def _glimpse_model(self):
        model = self.get_model()
        return model if getattr(model, "glimpse_enabled", False) else None

    # ---- before the step ---------------------------------------------------------------------

    def _update_states(self, scheduler_output):
        state = self._glimpse_state()
        model = self._glimpse_model
        for req_id in scheduler_output.finished_req_ids:
            state["originals"].pop(req_id, None)
            state["offsets"].pop(req_id, None)
            if model is not None:
                model.glimpse_release(req_id)
        # A request preempted mid-prefill loses the chunks it held; it is recomputed on resume.
        for req_id in scheduler_output.preempted_req_ids or ():
            if model is not None:
                model.glimpse_release(req_id)
        # A pruned request the scheduler preempted comes back to be recomputed from its
        # original prompt (the scheduler has restored the same on its side).
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            if model is not None:  # its chunks held before preemption are recomputed
                model.glimpse_release(req_id)
            original = state["originals"].pop(req_id, None)
            if original is None:
                continue
            state["offsets"].pop(req_id, None)
            req_state = self.requests[req_id]
            req_state.prompt_token_ids = list(original.prompt_token_ids)
            req_state.num_prompt_tokens = len(original.prompt_token_ids)
            req_state.mm_features = original.mm_features
            req_state.mrope_positions = original.mrope_positions
            req_state.mrope_position_delta = original.mrope_position_delta
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        state = self._glimpse_state()
        model = self._glimpse_model
        if model is None:
            return out
        num_reqs = self.input_batch.num_reqs
        starts = self.query_start_loc.np[: num_reqs + 1]
        # LLaVA's 1-D positions: pruned requests continue at their original positions. (The
        # slot mapping was computed from the token indices above, before this.)
        if not self.uses_mrope and state["offsets"]:
            for i, req_id in enumerate(self.input_batch.req_ids):
                offset = state["offsets"].get(req_id)
                if offset:
                    self.positions[int(starts[i]): int(starts[i + 1])] += offset
        state["plan"] = self._plan_step(model, num_scheduled_tokens, starts)
        model.glimpse_plan = state["plan"]
        return out

    def _plan_step(self, model, num_scheduled_tokens: np.ndarray, starts: np.ndarray):
        requests, deferred = [], []
        for i, req_id in enumerate(self.input_batch.req_ids):
            req_state = self.requests[req_id]
            images = [f for f in req_state.mm_features if f.modality == "image"]
            if not images:
                continue
            computed = int(self.input_batch.num_computed_tokens_cpu[i])
            scheduled = int(num_scheduled_tokens[i])
            images.sort(key=lambda f: f.mm_position.offset)
            first_image = images[0].mm_position.offset
            role = step_role(computed, scheduled, req_state.num_prompt_tokens, first_image)
            if role is None:
                continue
            spans = [ImageSpan(f.mm_position.offset, f.mm_position.length, model.glimpse_image_grid(f))
                     for f in images]
            if role == "defer":
                deferred.append(DeferRequest(
                    req_id=req_id, batch_index=i, row_start=int(starts[i]), num_computed=computed,
                    num_scheduled=scheduled, first_image=first_image, images=spans))
                continue
            requests.append(PruneRequest(
                req_id=req_id, batch_index=i, row_start=int(starts[i]),
                num_prompt_tokens=req_state.num_prompt_tokens, images=spans,
                block_ids=list(req_state.block_ids[0]),
                keep_overrides=keep_overrides_of(images[0]), num_computed=computed,
            ))
        if not requests and not deferred:
            return None
        if len(self.kv_cache_config.kv_cache_groups) != 1:
            raise RuntimeError("vllm-glimpse: GlimpsePrune supports models with one KV cache group")
        block_size = self.input_batch.block_table[0].block_size
        return GlimpseStepPlan(requests=requests, block_size=block_size,
                               switch_attention=self._switch_attention, deferred=deferred)

    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        """A prune step runs eagerly: no CUDA graph, no padding to a capture size (it syncs with
        the host and changes its token count mid-forward). vLLM's dispatcher takes ``force_eager``
        for its profile run; the plan was made just before, in :meth:`_prepare_inputs`."""
        if self._glimpse_state()["plan"] is not None:
            kwargs["force_eager"] = True
        return super()._determine_batch_execution_and_padding(*args, **kwargs)

    # ---- during the forward --------------------------------------------------------------------

    def _switch_attention(self, layer_names: list[str], lengths: dict[int, tuple[int, int]],
                          slot_mapping: torch.Tensor, num_tokens: int,
                          survivor_positions=None) -> None:
        """Point ``layer_names`` at attention metadata for the batch after pruning: request
        ``i`` has ``lengths[i]`` = (query length, sequence length) there. (``survivor_positions``
        is for MRv2's metadata, which carries positions; V1's does not.)"""
        num_reqs = self.input_batch.num_reqs
        query_start = self.query_start_loc.cpu[: num_reqs + 1].clone()
        query_lens = query_start.diff()
        seq_lens = (self.input_batch.num_computed_tokens_cpu_tensor[:num_reqs].to(query_lens.dtype)
                    + query_lens)
        for i, (query_len, seq_len) in lengths.items():
            query_lens[i] = query_len
            seq_lens[i] = seq_len
        query_start[1:] = torch.cumsum(query_lens, 0)
        device = self.query_start_loc.gpu.device
        cm = CommonAttentionMetadata(
            query_start_loc=query_start.to(device, non_blocking=True),
            query_start_loc_cpu=query_start,
            seq_lens=seq_lens.to(device=device, dtype=self.seq_lens.dtype),
            seq_lens_cpu_upper_bound=seq_lens,
            num_reqs=num_reqs,
            num_actual_tokens=num_tokens,
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=self.input_batch.block_table[0].get_device_tensor(num_reqs),
            slot_mapping=slot_mapping,
            causal=True,
            is_prefilling=(self.input_batch.num_computed_tokens_cpu_tensor[:num_reqs]
                           < self.input_batch.num_prompt_tokens_cpu_tensor[:num_reqs]),
        )
        context = get_forward_context()
        wanted = set(layer_names)
        for attn_group in self.attn_groups[0]:
            names = [n for n in attn_group.layer_names if n in wanted]
            if not names:
                continue
            metadata = attn_group.build_metadata(cm, ubatch_idx=0)
            for name in names:
                context.attn_metadata[name] = metadata
                context.slot_mapping[name] = slot_mapping

    def profile_run(self, *args, **kwargs):
        with prune_step_reservation(self.get_model(), self.max_num_tokens, self.device):
            return super().profile_run(*args, **kwargs)

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False, *args, **kwargs):
        super().initialize_kv_cache(kv_cache_config, is_profiling, *args, **kwargs)
        model = self._glimpse_model
        if model is not None and not is_profiling:
            model.glimpse_check_kv_cache(kv_cache_config, self.vllm_config)

    def _model_forward(self, *args, **kwargs):
        try:
            return super()._model_forward(*args, **kwargs)
        finally:
            model = self._glimpse_model
            if model is not None:
                model.glimpse_plan = None

    # ---- after the step ----------------------------------------------------------------------

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        state = self._glimpse_state()
        plan: GlimpseStepPlan | None = state["plan"]
        state["plan"] = None
        if plan is None or not plan.results:
            return output
        stats = {}
        for req in plan.requests:
            result = plan.results.get(req.req_id)
            if result is None or req.req_id not in self.requests:
                continue
            kept_ids = self._shrink_request(req, result)
            stats[req.req_id] = {
                "image_tokens_per_image_before": [s.length for s in req.images],
                "image_tokens_per_image_after": result.kept_per_image,
                "prompt_tokens_before": result.num_prompt_tokens - 1,  # without the glimpse token
                "prompt_tokens_after": result.num_kept,
                "kept_prompt_token_ids": kept_ids,
            }
        setattr(output, OUTPUT_ATTR, stats)
        return output

    def _shrink_request(self, req: PruneRequest, result: PruneResult) -> list[int]:
        """P -> P' on the worker: prompt ids, token buffer, counts, block table, positions."""
        state = self._glimpse_state()
        req_state = self.requests[req.req_id]
        P, kept = result.num_prompt_tokens, result.num_kept
        original = list(req_state.prompt_token_ids)
        state["originals"][req.req_id] = OriginalRequest(
            original, req_state.mm_features, req_state.mrope_positions, req_state.mrope_position_delta)
        kept_rows = result.kept_rows.tolist()
        kept_ids = [original[j] for j in kept_rows]
        outputs = list(req_state.output_token_ids)  # the token sampled now, unless discarded
        req_state.prompt_token_ids = kept_ids
        req_state.num_prompt_tokens = kept
        req_state.num_computed_tokens = kept
        req_state.mm_features = []
        shift = (P - 1) - kept  # original position of short index i is i + shift
        if req_state.mrope_positions is not None:
            req_state.mrope_positions = req_state.mrope_positions[:, result.kept_rows]
            req_state.mrope_position_delta += shift
        else:
            state["offsets"][req.req_id] = shift
        num_blocks = cdiv(kept, self.input_batch.block_table[0].block_size)
        for block_ids in req_state.block_ids:
            del block_ids[num_blocks:]
        index = self.input_batch.req_id_to_index.get(req.req_id)
        if index is not None:
            batch = self.input_batch
            total = kept + len(outputs)
            batch.token_ids_cpu[index, :kept] = kept_ids
            batch.token_ids_cpu[index, kept:total] = outputs
            # vLLM's input batch marks which positions hold token ids (not embeddings).
            batch.is_token_ids[index, :total] = True
            batch.num_tokens_no_spec[index] = total
            batch.num_prompt_tokens[index] = kept
            batch.num_computed_tokens_cpu[index] = kept
            for table in batch.block_table.block_tables:
                table.num_blocks_per_row[index] = num_blocks
        return kept_ids
