"""Our models' state on vLLM's Model Runner V2 (MRv2): the ``ModelState`` each model variant
returns from ``get_model_state_cls()``, which MRv2 asks every model for
(``vllm/v1/worker/gpu/model_states/__init__.py``, ``resolve_model_state_cls``).

* GlimpsePrune: :class:`GlimpseModelState` plans the step, rebuilds attention metadata for the
  layers that run on the survivors, and shrinks each pruned request's worker state after the step
  (where the worker learns a request's new length on MRv2).
* VisionZip on a Qwen-family model: :class:`VisionZipMRopeModelState` re-places the pruned image
  tokens' M-RoPE positions through vLLM's own ``MultiModalPruner``, which vLLM builds only when
  video pruning (EVS) is on.
* Method ``none``, and VisionZip on 1-D RoPE models: vLLM's ``DefaultModelState``.

Only MRv2 imports this module (the V1 runner never calls ``get_model_state_cls``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.forward_context import get_forward_context
from vllm.utils.math_utils import cdiv
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

from vllm_glimpse.engine.plan import (
    DeferRequest,
    GlimpseStepPlan,
    ImageSpan,
    PruneRequest,
    PruneResult,
    step_role,
)
from vllm_glimpse.models.common import keep_overrides_of
from vllm_glimpse.settings import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)


class VisionZipMRopeModelState(DefaultModelState):
    """vLLM's default state with the M-RoPE position recompute for pruned images switched on.

    The model's image embeddings carry each kept token's image-local (t, h, w) in extra channels;
    ``MultiModalPruner.recompute`` strips them and has the model's ``recompute_mrope_positions``
    write the final positions before the step's positions are prepared. vLLM creates the pruner
    only when ``video_pruning_rate > 0`` (``maybe_create_mm_pruner``), which would also switch on
    EVS for videos, so it is created here instead."""

    def __init__(self, vllm_config, model, encoder_cache, device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        if self.mm_pruner is None and self.rope_state is not None and encoder_cache is not None:
            self.mm_pruner = MultiModalPruner(model, self.rope_state, encoder_cache,
                                              self.model_config.get_inputs_embeds_size())


@dataclass
class _PromptToPrune:
    """A request with images whose prompt step has not run yet (it prunes in that step)."""

    prompt_token_ids: list[int]  # glimpse token included (the last one)
    block_ids: list[int]  # its KV blocks (group 0), as the scheduler allocates them chunk by chunk
    images: list  # its image MultiModalFeatureSpecs, in prompt order


def _images_to_prune(new_req_data) -> list:
    """A new request's images in prompt order, if it prunes: it has images and none of them
    was computed before (``num_computed_tokens`` > 0 are prefix-cache hits, which end before the
    first image); else none."""
    images = sorted((f for f in new_req_data.mm_features if f.modality == "image"),
                    key=lambda f: f.mm_position.offset)
    if images and new_req_data.num_computed_tokens <= images[0].mm_position.offset:
        return images
    return []


class GlimpseModelState(DefaultModelState):
    """GlimpsePrune on MRv2.

    Per step, through the state hooks MRv2 calls in this order:

    * ``preprocess_state`` (real batches only): plan the step — every request with images whose
      prompt (glimpse token last) ends in it prunes; one whose chunk covers image tokens but ends
      before the prompt does has those rows held after layer K (chunked prefill);
    * ``prepare_attn``: keep its arguments, to rebuild the metadata of the layers after K for the
      survivors (:meth:`_switch_attention`, called by the model in the middle of its forward);
    * ``prepare_inputs``: hand the plan to the model; 1-D RoPE models (LLaVA) get pruned requests'
      positions shifted back to their original values (the slot mapping is computed from the
      runner's own positions, which stay token indices);
    * ``postprocess_state`` (after sampling): P prompt tokens became P' survivors — rewrite the
      request's token row, lengths, computed count, block count and positions, and drop its images
      (nothing gathers them again), so the next step decodes at index P' over the short cache.

    A preempted request is removed here and comes back through ``add_request`` with its original
    prompt (the scheduler restores it, :mod:`vllm_glimpse.engine.scheduler`), so it prunes again.
    """

    def __init__(self, vllm_config, model, encoder_cache, device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        self.to_prune: dict[str, _PromptToPrune] = {}
        self.position_offsets: dict[str, int] = {}  # 1-D RoPE: req_id -> original - index
        self.pruned_stats: dict[str, dict] = {}  # for the step's ModelRunnerOutput
        self.plan: GlimpseStepPlan | None = None
        self._prompts: dict[str, list[int]] = {}  # the plan's requests' prompt ids
        self._batch = None  # the step's real InputBatch (dummy runs never plan)
        self._attn_args: tuple | None = None
        self.req_states = None
        self.block_tables = None

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        req_id = new_req_data.req_id
        self.position_offsets.pop(req_id, None)
        images = _images_to_prune(new_req_data)
        if images:
            prompt = list(new_req_data.prefill_token_ids[:new_req_data.prompt_len])
            self.to_prune[req_id] = _PromptToPrune(prompt, list(new_req_data.block_ids[0]), images)

    def begin_step(self, scheduler_output) -> bool:
        """Before the runner's step: note the blocks it adds to requests that will prune (MRv2
        hands them to its block tables only, on the device; the prune step needs them on the
        host), and say whether the step may split its forward at layer K (:meth:`prunes_in`)."""
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_blocks in zip(cached.req_ids, cached.new_block_ids):
            pending = self.to_prune.get(req_id)
            if pending is not None and new_blocks is not None:
                pending.block_ids.extend(new_blocks[0])
        return self.prunes_in(scheduler_output)

    def prunes_in(self, scheduler_output) -> bool:
        """Whether a step may prune or hold a chunk's rows (it splits the forward at layer K),
        from its scheduler output alone (the runner dispatches the batch's CUDA-graph mode before
        any state hook runs, even ``add_request``): it schedules a request that will prune, new
        in it or recorded before."""
        scheduled = scheduler_output.num_scheduled_tokens
        return (any(_images_to_prune(new) for new in scheduler_output.scheduled_new_reqs)
                or any(req_id in scheduled for req_id in self.to_prune))

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.to_prune.pop(req_id, None)
        self.position_offsets.pop(req_id, None)
        # Finished or preempted (a preempted request comes back through add_request and
        # recomputes its chunks).
        self.model.glimpse_release(req_id)

    def initialize_kv_cache(self, kv_cache_config, block_tables) -> None:
        super().initialize_kv_cache(kv_cache_config, block_tables)
        self.block_tables = block_tables

    # ---- before the forward --------------------------------------------------------------------

    def preprocess_state(self, input_batch, block_tables, kv_cache_config,
                         num_computed_tokens) -> None:
        super().preprocess_state(input_batch, block_tables, kv_cache_config, num_computed_tokens)
        self._batch, self.plan, self._attn_args = input_batch, None, None
        if not self.to_prune:
            return
        requests, deferred = [], []
        for i, req_id in enumerate(input_batch.req_ids):
            pending = self.to_prune.get(req_id)
            if pending is None:
                continue
            computed = int(input_batch.num_computed_tokens_np[i])
            scheduled = int(input_batch.num_scheduled_tokens[i])
            P = len(pending.prompt_token_ids)
            first_image = pending.images[0].mm_position.offset
            role = step_role(computed, scheduled, P, first_image)
            if role is None:
                continue
            spans = [ImageSpan(f.mm_position.offset, f.mm_position.length,
                               self.model.glimpse_image_grid(f)) for f in pending.images]
            row_start = int(input_batch.query_start_loc_np[i])
            if role == "defer":
                deferred.append(DeferRequest(
                    req_id=req_id, batch_index=i, row_start=row_start, num_computed=computed,
                    num_scheduled=scheduled, first_image=first_image, images=spans))
                continue
            del self.to_prune[req_id]
            self._prompts[req_id] = pending.prompt_token_ids
            requests.append(PruneRequest(
                req_id=req_id, batch_index=i, row_start=row_start,
                num_prompt_tokens=P, images=spans, block_ids=pending.block_ids,
                keep_overrides=keep_overrides_of(pending.images[0]), num_computed=computed))
        if not requests and not deferred:
            return
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise RuntimeError("vllm-glimpse: GlimpsePrune supports models with one KV cache group")
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self.plan = GlimpseStepPlan(requests=requests, block_size=block_size,
                                    switch_attention=self._switch_attention, deferred=deferred)

    def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                     kv_cache_config, *args, **kwargs):
        if self.plan is not None and input_batch is self._batch:
            self._attn_args = (block_tables, slot_mappings, attn_groups, kv_cache_config)
        return super().prepare_attn(input_batch, cudagraph_mode, block_tables, slot_mappings,
                                    attn_groups, kv_cache_config, *args, **kwargs)

    def prepare_inputs(self, input_batch, req_states):
        inputs = super().prepare_inputs(input_batch, req_states)
        real = input_batch is self._batch
        if real:
            self.req_states = req_states
        if real and self.rope_state is None and self.position_offsets:
            positions = input_batch.positions.clone()
            starts = input_batch.query_start_loc_np
            for i, req_id in enumerate(input_batch.req_ids):
                offset = self.position_offsets.get(req_id)
                if offset:
                    positions[int(starts[i]):int(starts[i + 1])] += offset
            inputs["positions"] = positions
        self.model.glimpse_plan = self.plan if real else None
        return inputs

    # ---- during the forward: layers after K on the survivors ------------------------------------

    def _switch_attention(self, layer_names: list[str], lengths: dict[int, tuple[int, int]],
                          slot_mapping: torch.Tensor, num_tokens: int,
                          survivor_positions: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Point ``layer_names`` at attention metadata for the batch after pruning: request ``i``
        has ``lengths[i]`` = (query length, sequence length) there; ``survivor_positions`` maps
        the step's token positions to the survivors'. Built by vLLM's own ``prepare_attn`` on the
        step's batch with those lengths."""
        batch = self._batch
        block_tables, slot_mappings, attn_groups, kv_cache_config = self._attn_args
        n = batch.num_reqs
        query_lens = np.diff(batch.query_start_loc_np[:n + 1]).astype(np.int64)
        # the change of each request's sequence length, as of its query length
        change = np.zeros(n, dtype=np.int64)
        seq_change = np.zeros(n, dtype=np.int64)
        upper_np = batch.seq_lens_cpu_upper_bound[:n].numpy()
        for i, (query_len, seq_len) in lengths.items():
            change[i] = query_len - query_lens[i]
            seq_change[i] = seq_len - int(upper_np[i])
        query_lens = query_lens + change
        starts_np = np.zeros_like(batch.query_start_loc_np)
        starts_np[1:n + 1] = np.cumsum(query_lens)
        starts_np[n + 1:] = starts_np[n]
        device = batch.query_start_loc.device
        seq_change_cpu = torch.from_numpy(seq_change)
        seq_lens = batch.seq_lens.clone()
        seq_lens[:n] += seq_change_cpu.to(device=device, dtype=seq_lens.dtype)
        upper = batch.seq_lens_cpu_upper_bound.clone()
        upper[:n] += seq_change_cpu.to(upper.dtype)
        # One KV cache group (planned so). The survivors can outnumber the step's tokens (rows
        # held from earlier chunks join them), so the mapping is not a slice of the step's.
        new_slots = slot_mapping.to(slot_mappings.dtype).unsqueeze(0)
        survivors_batch = dataclasses.replace(
            batch, num_tokens=num_tokens, num_tokens_after_padding=num_tokens,
            num_scheduled_tokens=query_lens.astype(batch.num_scheduled_tokens.dtype),
            query_start_loc=torch.from_numpy(starts_np).to(device),
            query_start_loc_np=starts_np, seq_lens=seq_lens, seq_lens_cpu_upper_bound=upper,
            positions=survivor_positions(batch.positions[:batch.num_tokens]),
            max_query_len=int(query_lens.max()))
        metadata = super().prepare_attn(survivors_batch, CUDAGraphMode.NONE, block_tables,
                                        new_slots, attn_groups, kv_cache_config)
        context = get_forward_context()
        for name in layer_names:
            context.attn_metadata[name] = metadata[name]
            context.slot_mapping[name] = slot_mapping

    # ---- after the step ------------------------------------------------------------------------

    def postprocess_state(self, idx_mapping, num_sampled, num_computed_tokens=None) -> None:
        super().postprocess_state(idx_mapping, num_sampled, num_computed_tokens)
        plan, self.plan = self.plan, None
        self._batch = self._attn_args = None
        self.model.glimpse_plan = None
        if plan is None:
            return
        for req in plan.requests:
            prompt = self._prompts.pop(req.req_id, None)
            result = plan.results.get(req.req_id)
            if result is None or req.req_id not in self.req_states.req_id_to_index:
                continue
            kept_ids = self._shrink_request(req, result, prompt, plan.block_size)
            self.pruned_stats[req.req_id] = {
                "image_tokens_per_image_before": [s.length for s in req.images],
                "image_tokens_per_image_after": result.kept_per_image,
                "prompt_tokens_before": result.num_prompt_tokens - 1,  # without the glimpse token
                "prompt_tokens_after": result.num_kept,
                "kept_prompt_token_ids": kept_ids,
            }

    def _shrink_request(self, req: PruneRequest, result: PruneResult, prompt: list[int],
                        block_size: int) -> list[int]:
        """P -> P' on the worker. The device tensors are rewritten in place (no host sync): the
        token row (survivors, then the tokens after the prompt: the one sampled now, or a
        resumed request's earlier outputs), total and prefill lengths, the computed count, the
        block count, and the positions (the survivors keep theirs; what follows continues from
        the glimpse token's position, as the unpruned request's output would)."""
        rs = self.req_states
        r = rs.req_id_to_index[req.req_id]
        P, kept = result.num_prompt_tokens, result.num_kept
        removed = P - kept
        prefill_len = int(rs.prefill_len.np[r])
        # The step computed the prompt; it sampled a token only if that ended the prefill.
        after = prefill_len - P + (1 if prefill_len == P else 0)
        device = rs.all_token_ids.gpu.device
        rows = result.kept_rows.to(device)
        ids = rs.all_token_ids.gpu[r]
        tail = ids[P:P + after].clone()
        ids[:kept] = ids[:P][rows]
        ids[kept:kept + after] = tail
        rs.total_len.gpu[r] = kept + after
        rs.num_computed_tokens.gpu[r] = kept
        rs.num_computed_tokens_np[r] = kept
        rs.num_computed_prefill_tokens[r] = kept
        rs.prompt_len.np[r] = kept
        rs.prefill_len.np[r] = prefill_len - removed
        rs.prompt_len.copy_to_uva()
        rs.prefill_len.copy_to_uva()
        rs.max_seq_len[r] -= removed
        tables = self.block_tables
        tables.num_blocks.np[0, r] = cdiv(kept, block_size)
        tables.num_blocks.copy_to_uva()
        shift = (P - 1) - kept  # original position of short index i is i + shift
        if self.rope_state is not None:
            rope = self.rope_state
            base = rope.num_dims * r
            table = rope.prefill_positions.gpu[base:base + rope.num_dims]
            survivors = table[:, :P][:, rows].clone()
            table[:, :kept] = survivors
            delta = int(rope.prefill_delta.np[r]) + shift
            rest = prefill_len - P  # a resumed request's earlier outputs
            if rest:
                table[:, kept:kept + rest] = (torch.arange(kept, kept + rest, device=table.device,
                                                           dtype=table.dtype) + delta)
            rope.prefill_delta.np[r] = delta
            rope.prefill_delta.copy_to_uva()
        else:
            self.position_offsets[req.req_id] = shift
        if self.encoder_cache is not None:
            self.encoder_cache.mm_features[req.req_id] = []
        return [prompt[j] for j in result.kept_rows.tolist()]


def model_state_cls(model) -> type:
    """The MRv2 ``ModelState`` class for one of our model variants."""
    if getattr(model, "glimpse_enabled", False):
        return GlimpseModelState
    if getattr(model, "needs_mrope_recompute", False):
        return VisionZipMRopeModelState
    return DefaultModelState
