"""Where the keep decision is made: GlimpsePrune inside the language model's forward.

Mixed into our Qwen2.5-VL and LLaVA-1.5 variants; inactive unless the engine runs method
``glimpse``. In a step where the runner hands over a :class:`~vllm_glimpse.engine.plan.
GlimpseStepPlan` (some requests' prefill ends in it and they have images):

1. the glimpse token (the last prompt token, appended by the processor) gets the learned
   embedding ``glimpse_embedding(0)``; before each layer l > 0 in ``le_layers`` the layer's
   embedding is added to its hidden state (docs/design.md §1, authors' ``_append_le`` / ``_try_add_le``);
2. layers 0..K run on every token of the batch, their attention inputs recorded;
3. per request, the glimpse query of each selected layer against the request's keys gives the
   VIP's attention input (raw logits for Qwen, log-softmax over the request's keys for LLaVA);
   with the vision conditions (carried as extra channels of the image embeddings) the VIP gives
   one logit per image token and the keep rule picks the survivors;
4. the survivors' K/V of layers 0..K move to compacted slots (:mod:`vllm_glimpse.engine.kv`),
   the batch shrinks to the survivors (their ORIGINAL positions kept), the runner points layers
   K+1.. at attention metadata for the short sequences, and those layers run;
5. each pruned request's last real token's hidden state is returned at the glimpse token's row,
   the row the sampler reads.

Rows of requests that do not prune (decodes, text-only prompts, other methods) pass through
unchanged: they are part of the same batch, only their row numbers shift.
"""

from __future__ import annotations

import logging

import torch
from vllm.forward_context import get_forward_context

from vllm_glimpse.engine.kv import (
    AttentionRecorder,
    flash_attention_views,
    compact_kv,
    compacted_slots,
)
from vllm_glimpse.engine.plan import GlimpseStepPlan, PruneResult
from vllm_glimpse.glimpse import (
    GlimpseCheckpoint,
    glimpse_attention_scores,
    load_glimpse_checkpoint,
    request_keep_rule,
)
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
        # Not nn.Module attributes: the predictor is loaded from its own checkpoint, after
        # vLLM's loader has checked that every registered parameter came from the model's.
        self.__dict__["_glimpse"] = None
        self.__dict__["_glimpse_recorders"] = []
        self.__dict__["_glimpse_conds"] = None

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

    # ---- embeddings -------------------------------------------------------------------------

    def _glimpse_cond_width(self) -> int:
        cfg = self.glimpse_checkpoint.config
        return len(cfg.selected_visual_layers) * self._glimpse_vision_hidden_size()

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        """Split the vision conditions off the image embeddings (they ride along as extra
        channels through vLLM's encoder cache) and keep them, by batch row, for the forward."""
        if self.glimpse_enabled:
            self.__dict__["_glimpse_conds"] = None
            if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
                hidden = self.config.get_text_config().hidden_size
                conds = torch.cat([e[:, hidden:] for e in multimodal_embeddings])
                multimodal_embeddings = [e[:, :hidden] for e in multimodal_embeddings]
                rows = torch.nonzero(is_multimodal).squeeze(-1)
                self.__dict__["_glimpse_conds"] = (conds, rows)
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
        if plan is None or not plan.requests:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if inputs_embeds is None:
            raise RuntimeError("GlimpsePrune needs the runner to pass input embeddings")
        return self._glimpse_forward(plan, positions, inputs_embeds)

    def _glimpse_forward(self, plan: GlimpseStepPlan, positions: torch.Tensor,
                         inputs_embeds: torch.Tensor) -> torch.Tensor:
        ckpt = self.glimpse_checkpoint
        cfg, predictor = ckpt.config, ckpt.predictor
        lm = self._glimpse_text_model()
        K = cfg.reduce_layer
        num_tokens = inputs_embeds.shape[0]
        glimpse_rows = torch.tensor([r.glimpse_row for r in plan.requests], device=inputs_embeds.device)

        # 1-2. the glimpse token, layers 0..K on every token, attention inputs recorded
        hidden = inputs_embeds.clone()
        hidden[glimpse_rows] = predictor.glimpse_embedding(0).to(hidden.dtype)
        residual = None
        recorders = self.__dict__["_glimpse_recorders"]
        for rec in recorders:
            rec.active = True
        try:
            for idx in range(K + 1):
                if idx > 0:
                    add = predictor.glimpse_embedding(idx)
                    if add is not None:
                        hidden[glimpse_rows] += add.to(hidden.dtype)
                hidden, residual = lm.layers[idx](positions, hidden, residual)
        finally:
            for rec in recorders:
                rec.active = False

        # 3. the keep decision, per request
        keep_rows = torch.ones(num_tokens, dtype=torch.bool, device=hidden.device)
        attention_inputs = self._glimpse_attention_inputs(plan, recorders, cfg)
        conditions = self._conditions_by_row(num_tokens)
        for req, attn_logits in zip(plan.requests, attention_inputs):
            result = self._decide(req, attn_logits, conditions, cfg, predictor)
            plan.results[req.req_id] = result
            rows = slice(req.row_start, req.row_start + req.num_prompt_tokens)
            local = torch.zeros(req.num_prompt_tokens, dtype=torch.bool, device=hidden.device)
            local[result.kept_rows.to(hidden.device)] = True
            keep_rows[rows] = local
        survivors = torch.nonzero(keep_rows).squeeze(-1)
        new_index = torch.cumsum(keep_rows.long(), 0) - 1  # old row -> row among survivors

        # 4. K/V of layers 0..K to compacted slots; layers K+1.. on the survivors
        layer_names = [layer.self_attn.attn.layer_name for layer in lm.layers[K + 1:]]
        slot_mapping = get_forward_context().slot_mapping[layer_names[0]][:num_tokens]
        new_slots = slot_mapping[survivors].clone()
        moved_rows, moved_slots = [], []
        for req in plan.requests:
            result = plan.results[req.req_id]
            rows = result.kept_rows.to(hidden.device) + req.row_start
            slots = compacted_slots(req.block_ids, result.num_kept, plan.block_size, hidden.device)
            moved_rows.append(rows)
            moved_slots.append(slots)
            new_slots[new_index[rows]] = slots.to(new_slots.dtype)
        compact_kv(recorders, torch.cat(moved_rows), torch.cat(moved_slots))
        for rec in recorders:
            rec.clear()
        removed = {req.batch_index: req.num_prompt_tokens - plan.results[req.req_id].num_kept
                   for req in plan.requests}
        plan.switch_attention(layer_names, removed, new_slots, int(survivors.numel()))

        hidden, residual = hidden[survivors], residual[survivors]
        positions = positions[..., survivors]
        for layer in lm.layers[K + 1:]:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)

        # 5. back to the step's rows; the sampler reads each request's last scheduled row
        out = hidden.new_zeros(num_tokens, hidden.shape[-1])
        out[survivors] = hidden
        last_real = glimpse_rows - 1
        out[glimpse_rows] = hidden[new_index[last_real]]
        return out

    def _glimpse_attention_inputs(self, plan, recorders, cfg) -> list[torch.Tensor]:
        """Per request, the VIP's attention input ``[N_img, len(selected_layers) * heads]``: the
        glimpse query against the image keys (raw logits), or log-softmax over all the request's
        keys then the image columns (``use_attention_logits`` false: LLaVA).

        On GPU with FlashAttention the fused kernel reads layer K's keys from the paged cache
        (``kernels/glimpse_triton.py``, one launch per selected layer for the whole batch); on
        CPU, whose cache layout is ISA-packed, the recorded keys of the step are used."""
        per_layer = []
        for layer in cfg.selected_layers:
            rec = recorders[layer]
            attn = rec.attn
            queries = rec.query.view(-1, attn.num_heads, attn.head_size)
            keys = rec.key.view(-1, attn.num_kv_heads, attn.head_size)
            views = flash_attention_views(attn)
            if views is not None:
                per_layer.append(self._fused_scores(plan, queries, views[0], attn, cfg))
                continue
            scores = []
            for req in plan.requests:
                rows = slice(req.row_start, req.row_start + req.num_prompt_tokens)
                scores.append(glimpse_attention_scores(
                    queries[req.glimpse_row].float(), keys[rows].float(),
                    _image_index(req, keys.device), use_attention_logits=cfg.use_attention_logits))
            per_layer.append(scores)
        # Tensor parallel: this rank computed its own heads; the VIP reads every head.
        return gather_head_features([torch.cat(layers, dim=-1) for layers in zip(*per_layer)],
                                    len(cfg.selected_layers))

    @staticmethod
    def _fused_scores(plan, queries, key_cache, attn, cfg) -> list[torch.Tensor]:
        from vllm_glimpse.kernels.glimpse_triton import glimpse_attention_logits

        device = queries.device
        glimpse_rows = torch.tensor([r.glimpse_row for r in plan.requests], device=device)
        width = max(len(r.block_ids) for r in plan.requests)
        block_table = torch.zeros(len(plan.requests), width, dtype=torch.int32)
        for i, r in enumerate(plan.requests):
            block_table[i, :len(r.block_ids)] = torch.tensor(r.block_ids, dtype=torch.int32)
        positions = [_image_index(r, "cpu") for r in plan.requests]
        offsets = torch.tensor([0] + [p.numel() for p in positions]).cumsum(0)
        seq_lens = None
        if not cfg.use_attention_logits:
            seq_lens = torch.tensor([r.num_prompt_tokens for r in plan.requests], device=device)
        scores = glimpse_attention_logits(
            queries[glimpse_rows], key_cache, block_table.to(device), torch.cat(positions).to(device),
            offsets.to(device), attn.impl.scale, seq_lens=seq_lens)
        return list(scores.split([p.numel() for p in positions]))

    def _conditions_by_row(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditions [M, C], row -> index into them [num_tokens], -1 for rows without)."""
        conds = self.__dict__["_glimpse_conds"]
        if conds is None:
            raise RuntimeError("GlimpsePrune: no vision conditions reached the forward")
        values, rows = conds
        lookup = torch.full((num_tokens,), -1, dtype=torch.long, device=rows.device)
        lookup[rows] = torch.arange(rows.numel(), device=rows.device)
        return values, lookup

    def _decide(self, req, attn_logits, conditions, cfg, predictor) -> PruneResult:
        """The keep decision for one request: survivors among its prompt rows."""
        device = attn_logits.device
        P = req.num_prompt_tokens
        image_index = _image_index(req, device)
        cond_values, lookup = conditions
        feats = cond_values[lookup[(image_index + req.row_start).to(lookup.device)]]
        width = self._glimpse_vision_hidden_size()
        vision_feats = list(feats.split(width, dim=-1))
        grids = [s.grid_hw for s in req.images]
        dtype = next(predictor.parameters()).dtype
        logits = predictor(attn_logits.to(dtype), [f.to(dtype) for f in vision_feats], grids)
        # Tensor parallel: one decision for all ranks (each compacts its own KV heads).
        logits = same_on_all_ranks(logits)
        if torch.isfinite(logits).all():
            rule = cfg.keep_rule if req.keep_overrides is None else request_keep_rule(
                cfg, req.keep_overrides)
            keep = rule(logits, grids[0] if len(grids) == 1 else None)
        else:  # a broken checkpoint must not take the engine down: this request is not pruned
            logger.warning("vllm-glimpse: request %s: the VIP gave non-finite logits; keeping all "
                           "%d image tokens", req.req_id, logits.numel())
            keep = torch.ones(logits.numel(), dtype=torch.bool, device=logits.device)
        keep_local = torch.ones(P - 1, dtype=torch.bool, device=device)  # the glimpse row goes
        keep_local[image_index] = keep.to(device)
        # The sampler reads the last real token's hidden state: it always stays (the authors'
        # prompts end with text; this matters only for a prompt ending in an image token).
        keep_local[-1] = True
        sizes = [s.length for s in req.images]
        kept_per_image = [int(m.sum()) for m in torch.split(keep_local[image_index], sizes)]
        return PruneResult(
            kept_rows=torch.nonzero(keep_local).squeeze(-1).cpu(),
            num_prompt_tokens=P,
            image_tokens_before=int(image_index.numel()),
            image_tokens_after=sum(kept_per_image),
            kept_per_image=kept_per_image,
        )


def _image_index(req, device) -> torch.Tensor:
    """Rows of the request's prompt that are image tokens (all its images, in order)."""
    return torch.cat([torch.arange(s.offset, s.offset + s.length) for s in req.images]).to(device)
