"""Where the keep decision is made: GlimpsePrune inside the language model's forward.

Mixed into our Qwen2.5-VL and LLaVA-1.5 variants; inactive unless the engine runs method
``glimpse``. In a step where the runner hands over a :class:`~vllm_glimpse.engine.plan.
GlimpseStepPlan` (some requests' prefill ends in it and they have images):

1. the glimpse token (the last prompt token, appended by the processor) gets the learned
   embedding ``glimpse_embedding(0)``; before each layer l > 0 in ``le_layers`` the layer's
   embedding is added to its hidden state (docs/design.md §1, authors' ``_append_le`` / ``_try_add_le``);
2. layers 0..K run on every token of the batch; only the glimpse rows' queries of the selected
   layers are kept from them (their K/V are in the paged cache, read back from there);
3. for all pruning requests at once: the glimpse query of each selected layer against the
   request's keys gives the VIP's attention input (raw logits for Qwen, log-softmax over the
   request's keys for LLaVA); with the vision conditions (carried as extra channels of the image
   embeddings) ONE VIP call gives one logit per image token of the batch, and the keep rule picks
   the survivors (:mod:`vllm_glimpse.engine.prune_step`: one host synchronisation per step);
4. the survivors' K/V of layers 0..K move to compacted slots (:mod:`vllm_glimpse.engine.kv`),
   the batch shrinks to the survivors (their ORIGINAL positions kept), the runner points layers
   K+1.. at attention metadata for the short sequences, and those layers run;
5. each pruned request's last real token's hidden state is returned at the glimpse token's row,
   the row the sampler reads.

Rows of requests that do not prune (decodes, text-only prompts, other methods) pass through
unchanged: they are part of the same batch, only their row numbers shift.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.forward_context import get_forward_context

from vllm_glimpse.engine.kv import AttentionRecorder, PagedKV, move_kv
from vllm_glimpse.engine.plan import GlimpseStepPlan, image_token_mask
from vllm_glimpse.engine.prune_step import (
    PruneBatch,
    StepRows,
    build_prune_batch,
    decide,
    glimpse_layer_logits,
    prune_step_peak_bytes,
)
from vllm_glimpse.glimpse import GlimpseCheckpoint, load_glimpse_checkpoint, request_keep_rule
from vllm_glimpse.glimpse.modules import VIP_CHUNK_ROWS
from vllm_glimpse.parallel import gather_head_features, same_on_all_ranks
from vllm_glimpse.settings import LOGGER_NAME, PruningSettingsError, pruning_config_of

logger = logging.getLogger(LOGGER_NAME)


class GlimpseModelMixin:
    """The model side of GlimpsePrune. Subclasses provide ``_glimpse_text_model()`` (the decoder
    with ``layers`` and ``norm``), ``glimpse_image_grid(mm_feature)`` and the vision
    conditions (``_glimpse_vision_layers_available``)."""

    glimpse_plan: GlimpseStepPlan | None = None

    def _init_glimpse(self, vllm_config) -> None:
        hf_config = vllm_config.model_config.hf_config
        config = pruning_config_of(hf_config)
        self.glimpse_settings = config.glimpse if config.method == "glimpse" else None
        self.glimpse_plan = None
        # With chunked prefill, a prune step also works on the rows held from earlier chunks: up
        # to a whole prompt of max_model_len tokens (memory profiling reserves for it). Only a
        # prompt the step budget cut holds rows, so normally one at a time; a
        # long_prefill_token_threshold cuts every long prompt, and that many can hold at once.
        sched = vllm_config.scheduler_config
        self.__dict__["_glimpse_longest_prompt"] = (
            vllm_config.model_config.max_model_len if sched.enable_chunked_prefill else 0)
        threshold = sched.long_prefill_token_threshold
        self.__dict__["_glimpse_held_prompts"] = 1 if threshold <= 0 else min(
            sched.max_num_seqs, -(-sched.max_num_batched_tokens // threshold))
        # Not nn.Module attributes: the predictor is loaded from its own checkpoint, after
        # vLLM's loader has checked that every registered parameter came from the model's.
        self.__dict__["_glimpse"] = None
        self.__dict__["_glimpse_recorders"] = []
        self.__dict__["_glimpse_conds"] = None
        self.__dict__["_glimpse_paged_kv"] = {}  # block size -> [PagedKV] of layers 0..K
        self.__dict__["_glimpse_held"] = {}  # req_id -> _HeldRows (chunked prefill)

    def get_model_state_cls(self) -> type:
        """Model Runner V2 asks the model for its state class (``vllm_glimpse.engine.
        model_states``: GlimpsePrune's when it is on)."""
        from vllm_glimpse.engine.model_states import model_state_cls

        return model_state_cls(self)

    @property
    def glimpse_enabled(self) -> bool:
        return self.glimpse_settings is not None

    @property
    def glimpse_checkpoint(self) -> GlimpseCheckpoint | None:
        return self.__dict__["_glimpse"]

    # ---- loading ----------------------------------------------------------------------------

    def _glimpse_vision_hidden_size(self) -> int:
        return self.config.vision_config.hidden_size

    def load_weights(self, weights):
        """vLLM's loader fills the model's own weights; then the GlimpsePrune modules come from
        their checkpoint, on the model's device and in its dtype."""
        loaded = super().load_weights(weights)
        if self.glimpse_enabled:
            self._load_glimpse()
        return loaded

    def _load_glimpse(self) -> None:
        hf_config = self.config
        lm = self._glimpse_text_model()
        param = next(lm.parameters())
        ckpt = load_glimpse_checkpoint(self.glimpse_settings.checkpoint, hf_config,
                                       self.glimpse_settings, dtype=param.dtype, device=param.device)
        cfg = ckpt.config
        num_layers = len(lm.layers)
        if cfg.reduce_layer >= num_layers - 1:
            raise PruningSettingsError(
                f"glimpse layer {cfg.reduce_layer} leaves no layer to run on the survivors: this "
                f"model has {num_layers} layers (0..{num_layers - 1})"
            )
        if cfg.le_length != 1:
            raise PruningSettingsError(
                f"glimpse checkpoint has le_length {cfg.le_length}; the engine supports one glimpse "
                "token (le_length 1, as every released checkpoint)"
            )
        available = self._glimpse_vision_layers_available()
        missing = [i for i in cfg.selected_visual_layers if not 0 <= i < available]
        if missing:
            raise PruningSettingsError(
                f"glimpse checkpoint reads vision layers {missing}, but this model's vision tower "
                f"provides layers 0..{available - 1}"
            )
        self.__dict__["_glimpse"] = ckpt
        self.__dict__["_glimpse_recorders"] = [
            AttentionRecorder(lm.layers[i].self_attn.attn) for i in range(cfg.reduce_layer + 1)
        ]
        logger.info("vllm-glimpse: GlimpsePrune checkpoint %s loaded (prune after layer %d, %s)",
                    ckpt.directory, cfg.reduce_layer, cfg.keep_rule)

    def glimpse_profile_reserve_bytes(self, num_tokens: int) -> int:
        """Bytes vLLM's memory profiling must hold for the prune step of a ``num_tokens`` step,
        beyond the dummy forward's own peak. The prune step runs between two decoder layers,
        when no MLP activations are alive; vLLM's gated MLP holds its gate/up output and the
        activated half together (3 x intermediate values per token), which the dummy forward
        already reached. Where the cache cannot be read back (any backend but FlashAttention,
        before the cache exists to be probed) the K/V of layers 0..K held during the step are
        counted in full, as they live across those MLPs.

        With chunked prefill a prompt's held rows (hidden state, residual, vision conditions;
        K/V of layers 0..K where the cache cannot be read back) live between steps, for each
        prompt that can be part-way at once; the prune step works on the step's tokens plus
        those held rows (up to ``max_model_len`` each), and the survivors among the held rows
        run on through layers K+1.. beyond the step's own tokens (hidden state, residual and
        MLP activations)."""
        if not self.glimpse_enabled or self.glimpse_checkpoint is None:
            return 0
        cfg = self.glimpse_checkpoint.config
        recorder = self.__dict__["_glimpse_recorders"][0]
        attn = recorder.attn
        text = self.config.get_text_config()
        weight = next(self._glimpse_text_model().parameters())
        elem = weight.element_size()
        readable = (type(attn.impl).__name__ == "FlashAttentionImpl"
                    and attn.impl.kv_cache_dtype == "auto")
        longest = (self.__dict__.get("_glimpse_longest_prompt", 0)
                   * self.__dict__.get("_glimpse_held_prompts", 1))  # rows held, all prompts
        prune_tokens = num_tokens + longest
        peak = prune_step_peak_bytes(prune_tokens, cfg, num_kv_heads=attn.num_kv_heads,
                                     head_size=attn.head_size, elem_size=elem,
                                     kv_recorded=not readable,
                                     row_chunk=None if weight.is_cuda else VIP_CHUNK_ROWS)
        kv_per_token = (cfg.reduce_layer + 1) * 2 * attn.num_kv_heads * attn.head_size * elem
        held = 0 if readable else prune_tokens * kv_per_token
        mlp = num_tokens * 3 * text.intermediate_size * elem
        cond = len(cfg.selected_visual_layers) * cfg.vision_hidden_size
        rows_held = longest * ((2 * text.hidden_size + cond) * elem
                               + (0 if readable else kv_per_token))
        after = longest * (2 * text.hidden_size + 3 * text.intermediate_size) * elem
        return rows_held + max(held, peak - mlp, after)

    # ---- embeddings -------------------------------------------------------------------------

    def _glimpse_cond_width(self) -> int:
        cfg = self.glimpse_checkpoint.config
        return len(cfg.selected_visual_layers) * self._glimpse_vision_hidden_size()

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        """Split the vision conditions off the image embeddings (they ride along as extra
        channels through vLLM's encoder cache) and keep them for the forward: as views of the
        embeddings (no copy: the encoder cache holds them anyway) with the step's multimodal row
        mask, which maps a row to its embedding row."""
        if self.glimpse_enabled:
            self.__dict__["_glimpse_conds"] = None
            if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
                hidden = self.config.get_text_config().hidden_size
                conds = [e[:, hidden:] for e in multimodal_embeddings]
                multimodal_embeddings = [e[:, :hidden] for e in multimodal_embeddings]
                self.__dict__["_glimpse_conds"] = (conds, is_multimodal)
        return super().embed_input_ids(input_ids, multimodal_embeddings,
                                       is_multimodal=is_multimodal, **kwargs)

    def _with_conditions(self, embeddings, conditions) -> tuple[torch.Tensor, ...]:
        """Image embeddings [N, hidden] + their conditions [N, n_layers * vision_hidden]."""
        return tuple(torch.cat([e, c.to(e.dtype)], dim=-1) for e, c in zip(embeddings, conditions))

    def _without_conditions(self, embeddings) -> tuple[torch.Tensor, ...]:
        """Media GlimpsePrune does not prune (videos) get zero conditions: one width for all."""
        width = self._glimpse_cond_width()
        return tuple(torch.cat([e, e.new_zeros(e.shape[0], width)], dim=-1) for e in embeddings)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        plan = self.glimpse_plan
        if plan is None or not (plan.requests or plan.deferred):
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if inputs_embeds is None:
            raise RuntimeError("GlimpsePrune needs the runner to pass input embeddings")
        return self._glimpse_forward(plan, positions, inputs_embeds)

    def glimpse_release(self, req_id: str) -> None:
        """Forget the rows held for a request (it finished, or was preempted: it recomputes)."""
        if self.glimpse_enabled:
            self.__dict__["_glimpse_held"].pop(req_id, None)

    def _glimpse_forward(self, plan: GlimpseStepPlan, positions: torch.Tensor,
                         inputs_embeds: torch.Tensor) -> torch.Tensor:
        ckpt = self.glimpse_checkpoint
        cfg, predictor = ckpt.config, ckpt.predictor
        lm = self._glimpse_text_model()
        K = cfg.reduce_layer
        num_tokens = inputs_embeds.shape[0]
        device = inputs_embeds.device
        paged = self._glimpse_layers_kv(plan.block_size)
        step_glimpse_rows = torch.tensor(
            [r.row_start + r.num_prompt_tokens - 1 - r.num_computed for r in plan.requests],
            dtype=torch.long).to(device, non_blocking=True)

        # 1-2. the glimpse token, layers 0..K on every token; kept from them: the glimpse rows'
        # queries of the selected layers (K/V only where the cache cannot be read back)
        hidden = inputs_embeds.clone()
        if plan.requests:
            hidden[step_glimpse_rows] = predictor.glimpse_embedding(0).to(hidden.dtype)
        residual = None
        recorders = self.__dict__["_glimpse_recorders"]
        for idx, rec in enumerate(recorders):
            selected = bool(plan.requests) and idx in cfg.selected_layers
            rec.query_rows = step_glimpse_rows if selected else None
            rec.keep_kv = not paged[idx].readable
            rec.active = True
        try:
            for idx in range(K + 1):
                if idx > 0 and plan.requests:
                    add = predictor.glimpse_embedding(idx)
                    if add is not None:
                        hidden[step_glimpse_rows] += add.to(hidden.dtype)
                hidden, residual = lm.layers[idx](positions, hidden, residual)
        finally:
            for rec in recorders:
                rec.active = False

        try:
            # chunks that stop before their glimpse token: rows from the first image on wait
            self._glimpse_hold(plan, hidden, residual, positions, recorders, paged, num_tokens)
            rows, held = self._glimpse_step_rows(plan, num_tokens, device)
            dropped = rows.ext_of_step[_deferred_rows(plan, device)]
            if plan.requests:
                hidden = rows.insert(hidden, [h.cat("hidden") for h in held])
                residual = rows.insert(residual, [h.cat("residual") for h in held])
                positions = rows.insert(positions, [h.cat("positions") for h in held], dim=-1)
                for layer, rec in enumerate(recorders):
                    if rec.keep_kv:
                        rec.key = rows.insert(rec.key.view(num_tokens, -1),
                                              [h.cat_kv("keys", layer) for h in held])
                        rec.value = rows.insert(rec.value.view(num_tokens, -1),
                                                [h.cat_kv("values", layer) for h in held])
                for h in held:  # the step's tensors have them now; only conditions are read on
                    h.drop_rows()
                decision, last_rows = self._glimpse_decide(plan, rows, held, recorders, paged,
                                                           cfg, predictor, dropped)
                keep_rows, survivors = decision.keep_rows, decision.survivors
                lengths = {req.batch_index: (result.num_kept - (req.num_computed - req.num_deferred),
                                             result.num_kept)
                           for req, result in zip(plan.requests, decision.results)}
            else:
                keep = np.ones(num_tokens, dtype=bool)
                for req in plan.deferred:
                    keep[req.deferred_rows.start:req.deferred_rows.stop] = False
                keep_rows = torch.from_numpy(keep).to(device, non_blocking=True)
                survivors = torch.from_numpy(np.nonzero(keep)[0]).to(device, non_blocking=True)
                lengths = {}
                decision = None
        finally:
            for rec in recorders:
                rec.clear()
        lengths.update({req.batch_index: req.lengths_after_k for req in plan.deferred})

        # 4. layers K+1.. on the survivors, with attention metadata for their lengths
        if survivors.numel() == 0:  # a step of held chunks only: nothing runs on, none sampled
            return hidden.new_zeros(num_tokens, hidden.shape[-1])
        layer_names = [layer.self_attn.attn.layer_name for layer in lm.layers[K + 1:]]
        step_slots = get_forward_context().slot_mapping[layer_names[0]][:num_tokens]
        slots = rows.insert(step_slots, [step_slots.new_zeros(n) for _, _, n in rows.insertions])
        new_slots = slots[survivors].clone()
        if decision is not None:
            new_slots[decision.moved_survivor_index] = decision.new_slots.to(new_slots.dtype)
        plan.switch_attention(layer_names, lengths, new_slots, int(survivors.numel()),
                              lambda step_positions: rows.token_positions(step_positions)[survivors])

        hidden, residual = hidden[survivors], residual[survivors]
        positions = positions[..., survivors]
        for layer in lm.layers[K + 1:]:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)

        # 5. back to the step's rows; the sampler reads each request's last scheduled row (a
        # held chunk's is never sampled: its prefill goes on)
        out = hidden.new_zeros(rows.num_rows, hidden.shape[-1])
        out[survivors] = hidden
        out = out[rows.ext_of_step]
        if decision is not None:
            new_index = torch.cumsum(keep_rows.long(), 0) - 1  # row -> survivor row
            out[step_glimpse_rows] = hidden[new_index[last_rows]]
        return out

    def _glimpse_decide(self, plan: GlimpseStepPlan, rows: StepRows, held: list[_HeldRows],
                        recorders, paged, cfg, predictor, dropped: torch.Tensor):
        """3. the keep decision for every pruning request at once, on the rows after layer K
        (``rows``: the step's, with the rows held from earlier chunks), and the survivors' K/V
        of layers 0..K moved to compacted slots."""
        device = dropped.device
        rules = [cfg.keep_rule if r.keep_overrides is None else
                 request_keep_rule(cfg, r.keep_overrides) for r in plan.requests]
        starts = rows.held_row_starts()
        k = 0
        requests = []
        for req in plan.requests:  # the plan's requests with their rows in this layout
            if req.num_deferred:
                row_start = starts[k]
                k += 1
            else:
                row_start = int(rows.ext_of_step_np[req.row_start])
            requests.append(dataclasses.replace(  # the held rows are now step rows
                req, row_start=row_start, num_computed=req.num_computed - req.num_deferred))
        batch = build_prune_batch(dataclasses.replace(plan, requests=requests), rules, device)
        attn_input = self._glimpse_vip_attention_input(plan, batch, recorders, paged, cfg)
        features = self._glimpse_condition_features(plan, batch, rows, held)
        grids = [s.grid_hw for r in plan.requests for s in r.images]
        dtype = next(predictor.parameters()).dtype
        # ONE VIP call for every image of every pruning request: attention inside the VIP stays
        # within each image, so concatenating requests changes nothing.
        vip_logits = predictor(attn_input.to(dtype), features, grids)
        # Tensor parallel: one decision for all ranks (each compacts its own KV heads).
        vip_logits = same_on_all_ranks(vip_logits)
        del attn_input
        decision = decide(batch, vip_logits, rows.num_rows, dropped_rows=dropped)
        for req, result, nonfinite in zip(plan.requests, decision.results, decision.nonfinite):
            plan.results[req.req_id] = result
            if nonfinite:  # a broken checkpoint must not take the engine down
                logger.warning("vllm-glimpse: request %s: the VIP gave non-finite logits; "
                               "keeping all %d image tokens", req.req_id,
                               result.image_tokens_before)
        move_kv(paged, recorders, decision.old_slots, decision.new_slots, decision.moved_rows)
        return decision, batch.last_rows

    # ---- chunked prefill: rows held between steps -------------------------------------------

    def _glimpse_hold(self, plan: GlimpseStepPlan, hidden, residual, positions, recorders,
                      paged, num_tokens: int) -> None:
        """Keep, for each chunk that reaches its request's first image but not its glimpse
        token, the layer-K state of its rows from the first image on (hidden state, residual,
        positions; the image tokens' vision conditions; K/V where the cache cannot be read
        back), to join the step that prunes the request."""
        if not plan.deferred:
            return
        store = self.__dict__["_glimpse_held"]
        device = hidden.device
        step_conds = all_conds = None
        for req in plan.deferred:
            first = req.first_deferred
            held = store.get(req.req_id)
            if first == req.first_image:  # the chunk that reaches the first image starts afresh
                held = store[req.req_id] = _HeldRows(first_token=first)
            elif held is None or held.first_token + held.num_tokens != first:
                have = "none" if held is None else \
                    f"tokens {held.first_token}..{held.first_token + held.num_tokens - 1}"
                raise RuntimeError(f"vllm-glimpse: request {req.req_id}: a chunk from token {first} "
                                   f"on, but the rows held for it are {have}")
            span = req.deferred_rows
            index = torch.arange(span.start, span.stop, device=device)
            held.parts["hidden"].append(hidden[index])
            held.parts["residual"].append(residual[index])
            held.parts["positions"].append(positions[..., index])
            is_image = image_token_mask(req.images, first, len(span))
            if is_image.any():
                if step_conds is None:
                    step_conds = self._glimpse_step_conditions(num_tokens)
                    if step_conds is None:
                        raise RuntimeError("GlimpsePrune: no vision conditions reached the forward")
                    all_conds = torch.cat(step_conds[0])
                image_rows = index[torch.from_numpy(np.nonzero(is_image)[0]).to(device)]
                held.parts["conditions"].append(all_conds[step_conds[1][image_rows]])
            for layer, (kv, rec) in enumerate(zip(paged, recorders)):
                if not kv.readable:
                    held.kv["keys"].setdefault(layer, []).append(rec.key.view(num_tokens, -1)[index])
                    held.kv["values"].setdefault(layer, []).append(
                        rec.value.view(num_tokens, -1)[index])
            held.num_tokens += len(span)

    def _glimpse_step_rows(self, plan: GlimpseStepPlan, num_tokens: int, device
                           ) -> tuple[StepRows, list[_HeldRows]]:
        """The rows after layer K (:class:`StepRows`) and, in their order, the held rows of
        the pruning requests that have some (they leave the store: this step consumes them)."""
        store = self.__dict__["_glimpse_held"]
        insertions, held = [], []
        for req in plan.requests:
            rows = store.pop(req.req_id, None)
            if not req.num_deferred:
                continue
            first = req.num_computed - req.num_deferred
            if rows is None or rows.first_token != first or rows.num_tokens != req.num_deferred:
                have = "none" if rows is None else \
                    f"tokens {rows.first_token}..{rows.first_token + rows.num_tokens - 1}"
                raise RuntimeError(f"vllm-glimpse: request {req.req_id} prunes with tokens "
                                   f"{first}..{req.num_computed - 1} from earlier chunks, but the "
                                   f"rows held for it are {have}")
            insertions.append((req.row_start, first, req.num_deferred))
            held.append(rows)
        return StepRows(num_tokens, insertions, device), held

    def _glimpse_condition_features(self, plan, batch: PruneBatch, rows: StepRows,
                                    held: list[_HeldRows]) -> _ConditionFeatures:
        """The vision conditions of the batch's image tokens: the step's (views of its
        multimodal embeddings) and those held from earlier chunks."""
        width = self._glimpse_vision_hidden_size()
        layers = len(self.glimpse_checkpoint.config.selected_visual_layers)
        device = batch.image_rows.device
        step_conds = self._glimpse_step_conditions(rows.num_step_rows)
        parts = [] if step_conds is None else list(step_conds[0])
        held_conds = [c for h in held for c in h.parts["conditions"]]
        if not held_conds and step_conds is None:
            raise RuntimeError("GlimpsePrune: no vision conditions reached the forward")
        total = sum(p.shape[0] for p in parts)
        if not held_conds and total == batch.image_rows.shape[0]:
            return _ConditionFeatures(parts, None, width, layers)  # every step image row prunes
        # Row -> its condition's index in the concatenation of the step's conditions and, after
        # them, the held ones in the rows' order.
        rank_ext = torch.full((rows.num_rows,), -1, dtype=torch.long, device=device)
        if step_conds is not None:
            rank_ext[rows.ext_of_step] = step_conds[1]
        base = total
        for start, req, h in zip(rows.held_row_starts(),
                                 [r for r in plan.requests if r.num_deferred], held):
            local = np.nonzero(image_token_mask(req.images, h.first_token, h.num_tokens))[0]
            rank_ext[torch.from_numpy(start + local).to(device)] = torch.arange(
                base, base + local.size, device=device)
            base += local.size
        if held_conds:
            parts.append(torch.cat(held_conds))
        return _ConditionFeatures(parts, rank_ext[batch.image_rows], width, layers)

    def _glimpse_step_conditions(self, num_tokens: int):
        """The step's vision conditions (views ``[n_i, layers * width]`` of its multimodal
        embeddings) and each step row's index among its multimodal rows; None without any."""
        conds = self.__dict__["_glimpse_conds"]
        if conds is None:
            return None
        parts, is_multimodal = conds
        return parts, torch.cumsum(is_multimodal[:num_tokens].long(), 0) - 1

    def glimpse_check_kv_cache(self, kv_cache_config, vllm_config) -> None:
        """At start-up, once the KV cache exists. LLaVA's glimpse scores are a softmax over
        every key of the prompt; keys of tokens from the prefix cache or from earlier chunks
        live only in the paged cache. A cache that cannot be read back (a quantized one turns
        both features off earlier, in the engine config) would fail those requests mid-serve:
        refuse now, in one line. Qwen's raw logits need only the image tokens' keys, which are
        never prefix-cache hits and are held across chunks."""
        if (not self.glimpse_enabled or self.glimpse_checkpoint is None
                or self.glimpse_checkpoint.config.use_attention_logits):
            return
        features = [name for name, on in (
            ("prefix caching", vllm_config.cache_config.enable_prefix_caching),
            ("chunked prefill", vllm_config.scheduler_config.enable_chunked_prefill)) if on]
        if not features:
            return
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        reasons = sorted({kv.unreadable for kv in self._glimpse_layers_kv(block_size)
                          if not kv.readable})
        if reasons:
            raise PruningSettingsError(
                f"GlimpsePrune on LLaVA with {' and '.join(features)} reads every prompt key "
                f"back from the paged KV cache, which this engine's cannot give back "
                f"({'; '.join(reasons)}): use FlashAttention (--attention-backend FLASH_ATTN) or "
                f"start with --no-enable-prefix-caching --no-enable-chunked-prefill")

    def _glimpse_layers_kv(self, block_size: int) -> list[PagedKV]:
        """Layers 0..K's paged K/V (readers/writers), built once per block size; logs once why a
        cache cannot be read back (the step then keeps those layers' K/V while they run)."""
        cache = self.__dict__["_glimpse_paged_kv"]
        if block_size not in cache:
            layers = [PagedKV(rec.attn, block_size) for rec in self.__dict__["_glimpse_recorders"]]
            reasons = sorted({kv.unreadable for kv in layers if not kv.readable})
            if reasons:
                logger.warning("vllm-glimpse: the KV cache of %d of layers 0..%d cannot be read back "
                               "(%s); the prune step keeps their K/V of the step while they run",
                               sum(not kv.readable for kv in layers), len(layers) - 1,
                               "; ".join(reasons))
            cache[block_size] = layers
        return cache[block_size]

    # ---- the VIP's inputs ------------------------------------------------------------------

    def _glimpse_vip_attention_input(self, plan, batch: PruneBatch, recorders, paged, cfg
                                     ) -> torch.Tensor:
        """The VIP's attention input for every pruning request's image tokens, requests
        concatenated: float32 ``[T, len(selected_layers) * heads]``, layer-major (each selected
        layer's per-head logits from :meth:`_glimpse_layer_logits`, side by side)."""
        per_layer = [self._glimpse_layer_logits(plan, batch, recorders[layer], paged[layer], cfg)
                     for layer in cfg.selected_layers]
        # Tensor parallel: this rank computed its own heads; the VIP reads every head.
        return gather_head_features([torch.cat(per_layer, dim=-1)], len(cfg.selected_layers))[0]

    def _glimpse_layer_logits(self, plan, batch: PruneBatch, rec, kv: PagedKV, cfg) -> torch.Tensor:
        """One selected layer's glimpse logits, float32 ``[T, heads]`` for this layer's heads as
        the attention module holds them (:func:`glimpse_layer_logits`: from the paged cache)."""
        attn = rec.attn
        queries = rec.query.view(-1, attn.num_heads, attn.head_size)  # [B, heads, D]
        recorded = None if kv.readable else rec.key.view(-1, attn.num_kv_heads, attn.head_size)
        return glimpse_layer_logits(batch, queries, kv, scale=attn.impl.scale,
                                    use_attention_logits=cfg.use_attention_logits,
                                    recorded_keys=recorded)


@dataclass
class _HeldRows:
    """A request's rows from its first image on, computed through layer K in earlier chunks of
    its prefill: chunks of hidden state, residual, positions and image tokens' conditions
    (``parts``), and of layers 0..K's K/V where the cache cannot be read back (``kv``)."""

    first_token: int
    num_tokens: int = 0
    parts: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {
        "hidden": [], "residual": [], "positions": [], "conditions": []})
    kv: dict[str, dict[int, list[torch.Tensor]]] = field(
        default_factory=lambda: {"keys": {}, "values": {}})

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name], dim=-1 if name == "positions" else 0)

    def cat_kv(self, name: str, layer: int) -> torch.Tensor:
        return torch.cat(self.kv[name][layer])

    def drop_rows(self) -> None:
        """Free the held hidden state, residual, positions and K/V once the prune step has
        inserted them into its own tensors (the image tokens' conditions stay: the keep
        decision reads them)."""
        for name in ("hidden", "residual", "positions"):
            self.parts[name] = []
        self.kv = {"keys": {}, "values": {}}


def _deferred_rows(plan: GlimpseStepPlan, device) -> torch.Tensor:
    """The step's rows that stop after layer K (chunks held for a later step)."""
    rows = [np.arange(r.deferred_rows.start, r.deferred_rows.stop) for r in plan.deferred]
    rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(rows.astype(np.int64)).to(device, non_blocking=True)


class _LazyFeature:
    """One vision layer's features of the batch's image tokens, built when the VIP reaches the
    block that reads them (``.to``), so only one layer's copy exists at a time."""

    def __init__(self, owner: _ConditionFeatures, index: int) -> None:
        self.owner, self.index = owner, index

    @property
    def shape(self) -> tuple[int, int]:
        return (self.owner.num_rows, self.owner.width)

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.owner.build(self.index).to(*args, **kwargs)


class _ConditionFeatures:
    """The vision conditions of the batch's image tokens, per vision layer, as the VIP's
    ``vision_feats`` sequence. ``parts``: ``[n_i, layers * width]`` tensors (views of the step's
    multimodal embeddings, and those held from earlier chunks); ``index``: each image token's
    row in their concatenation (None: the identity)."""

    def __init__(self, parts, index: torch.Tensor | None, width: int, layers: int) -> None:
        self.parts, self.index, self.width, self.layers = parts, index, width, layers
        self.num_rows = sum(p.shape[0] for p in parts) if index is None else index.shape[0]

    def __len__(self) -> int:
        return self.layers

    def __getitem__(self, i: int) -> _LazyFeature:
        if not 0 <= i < self.layers:
            raise IndexError(i)
        return _LazyFeature(self, i)

    def __iter__(self):
        return (self[i] for i in range(self.layers))

    def build(self, i: int) -> torch.Tensor:
        cols = slice(i * self.width, (i + 1) * self.width)
        feats = torch.cat([p[:, cols] for p in self.parts])
        return feats if self.index is None else feats[self.index]
