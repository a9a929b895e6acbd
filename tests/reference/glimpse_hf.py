"""Independent reference of GlimpsePrune inference on HF transformers' model classes.

Plain, batch size 1, float32, eager attention: the decoder layers of the HF model are called one
by one with the model's own rotary embeddings, a causal mask built here and a small KV store
kept here, so that the glimpse token can be appended and the prompt compacted after layer K.
It imports nothing from vLLM. From ``vllm_glimpse.glimpse`` it takes only the method's
parameters: the new modules (:class:`GlimpsePredictor`: glimpse embeddings and the VIP) and the
keep rule. The glimpse attention scores are computed here from the HF layer's own projections.

Order of operations, from the authors' code (GitHub HVision-NKU/GlimpsePrune,
``transformers_gp/models/qwen2_5_vl/model_gp.py`` and ``llava_gp/model/language_model/llava_llama.py``):

* ``forward``: GlimpsePrune runs only at the prefill of a request that has images
  (``do_selection and pixel_values is not None``); a text-only request runs unchanged.
* ``_append_le``: the glimpse token's layer-0 input is ``le_norm(le_proj(E[le_layers.index(0)]))``
  (the embedding itself, not added to anything), appended after the last prompt token, at
  position ``position_ids[-1, b, -1] + 1`` on all three M-RoPE axes (Qwen) / ``position_ids[b, -1]
  + 1`` (LLaVA).
* ``_glimpse_forward``: before each layer l > 0, ``_try_add_le`` *adds*
  ``le_norm(le_proj(E[le_layers.index(l)]))`` to the glimpse token's hidden state (layers not in
  ``le_layers`` get nothing); the layers run up to ``max(max(selected_layers), reduce_layer)``;
  at each selected layer the glimpse query (post-RoPE) against every key (post-RoPE) gives
  ``q.k / sqrt(head_dim)``, GQA keys repeated (``repeat_kv``), raw when ``use_attention_logits``
  else ``log_softmax`` over all keys (``_cal_attn_weights``), image columns taken → ``[N, heads]``,
  stacked layer-major.
* ``_visual_forward`` (Qwen): conditions = output of ViT block i for i in
  ``selected_visual_layers``, mean over each 2x2 merge unit (window order), put back into raster
  order (``reverse_indices``); ``encode_images`` (LLaVA): ``hidden_states[i][:, 1:]`` of CLIP.
* ``_get_remain_masks``: keep rule per sample over all of its image tokens, on the last VIP output.
* ``_glimpse_forward`` step 6 + ``_reduce_tokens``: the glimpse token is cropped from hidden
  states and from the KV of every layer run so far; pruned image tokens are removed from hidden
  states, KV and position ids (survivors keep their original positions).
* ``_glimpse_forward_after_reduction``: layers K+1..L-1 run on the survivors with their
  original position ids; logits of the last survivor give the first token.
* ``_update_model_kwargs_for_generation``: decode positions continue at the last prompt token's
  position + 1 (per axis, ``position_ids[:, :, -1:] + 1``), over the short cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_glimpse.glimpse import GlimpsePredictor, KeepRule

__all__ = [
    "GlimpseResult",
    "PreparedPrompt",
    "prepare_qwen",
    "qwen_pool_to_raster",
    "prepare_llava",
    "glimpse_generate",
    "GlimpseReference",
]


# --------------------------------------------------------------------------------------------
# Inputs as HF builds them
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedPrompt:
    """One request's prefill inputs, exactly as the HF model would build them."""

    family: str  # "qwen2_5_vl" or "llava"
    input_ids: torch.Tensor  # [P]
    inputs_embeds: torch.Tensor  # [P, hidden] (image features scattered in)
    positions: torch.Tensor  # Qwen: [3, P] M-RoPE; LLaVA: [1, P]
    image_index: torch.Tensor  # [N] rows of the prompt that are image tokens (all images, in order)
    grid_hw: list[tuple[int, int]]  # per image: rows, columns of its tokens
    vision_feats: list[torch.Tensor]  # per selected_visual_layers: [N, vision_hidden], raster order


def qwen_pool_to_raster(visual, block_output: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """A ViT block output ``[S, C]`` (patches in the ViT's window order, each 2x2 merge unit
    contiguous) → mean over each merge unit, merged tokens back into raster order ``[S/4, C]``
    (authors' ``_visual_forward``: ``mean(dim=1)`` then ``[reverse_indices]``)."""
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    unit = visual.spatial_merge_unit
    pooled = block_output.reshape(block_output.shape[0] // unit, unit, -1).mean(1)
    return pooled[torch.argsort(window_index)]


@torch.no_grad()
def prepare_qwen(model, processor, prompt: str, images, selected_visual_layers=()) -> PreparedPrompt:
    """Qwen2.5-VL: processor → token ids; ViT → image embeddings (scattered into the text
    embeddings) and the outputs of ``selected_visual_layers`` blocks mean-pooled per 2x2 merge
    unit, put back into raster order; ``get_rope_index`` → M-RoPE positions [3, P]."""
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    ids = inputs.input_ids[0]
    lm = model.model
    embeds = lm.get_input_embeddings()(ids).clone()
    image_index = torch.nonzero(ids == model.config.image_token_id).squeeze(-1)
    grid_hw, feats = [], []
    if images:
        visual = lm.visual
        grid_thw = inputs.image_grid_thw
        captured: dict[int, torch.Tensor] = {}

        def keep(i):
            def hook(module, args, out):
                captured[i] = out[0] if isinstance(out, tuple) else out
            return hook

        hooks = [visual.blocks[i].register_forward_hook(keep(i)) for i in selected_visual_layers]
        try:
            image_embeds = visual(inputs.pixel_values.to(visual.dtype), grid_thw=grid_thw).pooler_output
        finally:
            for h in hooks:
                h.remove()
        if image_embeds.shape[0] != image_index.numel():
            raise ValueError(f"{image_embeds.shape[0]} image features for {image_index.numel()} image tokens")
        embeds[image_index] = image_embeds.to(embeds.dtype)
        feats = [qwen_pool_to_raster(visual, captured[i], grid_thw) for i in selected_visual_layers]
        merge = visual.spatial_merge_size
        for t, h, w in grid_thw.tolist():
            for _ in range(t):
                grid_hw.append((h // merge, w // merge))
        positions, _ = lm.get_rope_index(inputs.input_ids, inputs.mm_token_type_ids, grid_thw)
        positions = positions[:, 0]  # [3, P]
    else:
        positions = torch.arange(ids.numel()).view(1, -1).expand(3, -1)
    return PreparedPrompt("qwen2_5_vl", ids, embeds, positions.clone(), image_index, grid_hw, feats)


@torch.no_grad()
def prepare_llava(model, processor, prompt: str, images, selected_visual_layers=()) -> PreparedPrompt:
    """LLaVA-1.5: processor → ids with each ``<image>`` expanded to 576 tokens; CLIP → projector
    features of ``vision_feature_layer`` (CLS dropped) and ``hidden_states[i][:, 1:]`` for each
    selected visual layer; 1-D positions ``arange(P)``."""
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    ids = inputs.input_ids[0]
    config = model.config
    embeds = model.get_input_embeddings()(ids).clone()
    image_index = torch.nonzero(ids == config.image_token_index).squeeze(-1)
    grid_hw, feats = [], []
    if images:
        out = model.model.get_image_features(
            inputs.pixel_values, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        image_embeds = torch.cat(list(out.pooler_output))  # [n_images * 576, hidden]
        if image_embeds.shape[0] != image_index.numel():
            raise ValueError(f"{image_embeds.shape[0]} image features for {image_index.numel()} image tokens")
        embeds[image_index] = image_embeds.to(embeds.dtype)
        side = config.vision_config.image_size // config.vision_config.patch_size
        grid_hw = [(side, side)] * len(images)
        for i in selected_visual_layers:
            feats.append(out.hidden_states[i][:, 1:].reshape(-1, out.hidden_states[i].shape[-1]))
    positions = torch.arange(ids.numel()).view(1, -1)
    return PreparedPrompt("llava", ids, embeds, positions, image_index, grid_hw, feats)


# --------------------------------------------------------------------------------------------
# Running HF decoder layers by hand
# --------------------------------------------------------------------------------------------


class SimpleKV:
    """The KV store handed to the HF attention modules: they call ``update(k, v, layer_idx)``
    with post-RoPE ``[1, kv_heads, q_len, head_dim]`` and attend over what it returns."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.keys:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        else:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return self.keys[layer_idx], self.values[layer_idx]

    def length(self, layer_idx: int) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0


class _TextModel:
    """What differs between the two families: where the parts are, RoPE layout."""

    def __init__(self, model, family: str) -> None:
        self.family = family
        if family == "qwen2_5_vl":
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
            self.lm = model.model.language_model
        else:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
            self.lm = model.model.language_model
        self.apply_rope = apply_rotary_pos_emb
        self.lm_head = model.lm_head
        self.embed = model.get_input_embeddings()
        self.layers = self.lm.layers
        cfg = self.lm.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) for ``positions`` ([3, S] Qwen, [1, S] LLaVA) from the model's own module."""
        if self.family == "qwen2_5_vl":
            return self.lm.rotary_emb(hidden[None], positions[:, None, :])
        return self.lm.rotary_emb(hidden[None], positions)

    def run_layer(self, idx: int, hidden: torch.Tensor, cos_sin, kv: SimpleKV) -> torch.Tensor:
        """One HF decoder layer on ``hidden [S, H]`` (new tokens after ``kv``'s entries)."""
        q_len = hidden.shape[0]
        past = kv.length(idx)
        if q_len > 1:  # causal mask over past + new keys; a single query sees everything
            allowed = torch.ones(q_len, past + q_len, dtype=torch.bool).tril(diagonal=past)
            mask = torch.zeros(q_len, past + q_len, dtype=hidden.dtype)
            mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
            mask = mask[None, None]
        else:
            mask = None
        out = self.layers[idx](hidden[None], attention_mask=mask, position_embeddings=cos_sin,
                               past_key_values=kv, use_cache=True)
        out = out[0] if isinstance(out, tuple) else out
        return out[0]

    def glimpse_query(self, idx: int, layer_input: torch.Tensor, cos_sin) -> torch.Tensor:
        """Post-RoPE query ``[heads, head_dim]`` of the last row of ``layer_input`` at layer idx,
        recomputed from the layer's own norm and projection."""
        layer = self.layers[idx]
        x = layer.input_layernorm(layer_input[-1:][None])  # [1, 1, H]
        q = layer.self_attn.q_proj(x).view(1, 1, self.num_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q, _ = self.apply_rope(q, q, cos[:, -1:], sin[:, -1:])
        return q[0, :, 0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.lm.norm(hidden))


def glimpse_scores(query: torch.Tensor, keys: torch.Tensor, image_index: torch.Tensor,
                   use_attention_logits: bool) -> torch.Tensor:
    """``[N, heads]``: ``q.k / sqrt(d)`` of the glimpse query against all keys ``[kv_heads, S, d]``
    (GQA: each KV head serves ``heads / kv_heads`` consecutive query heads), raw or log-softmax
    over all S keys, image columns."""
    heads, d = query.shape
    keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)  # [heads, S, d]
    scores = (keys @ query[:, :, None])[..., 0] / math.sqrt(d)  # [heads, S]
    if not use_attention_logits:
        scores = torch.log_softmax(scores, dim=-1)
    return scores[:, image_index].T


# --------------------------------------------------------------------------------------------
# GlimpsePrune inference
# --------------------------------------------------------------------------------------------


@dataclass
class GlimpseResult:
    tokens: list[int]
    keep: torch.Tensor | None  # [N] bool over the image tokens (images in order), None: no images
    kept_per_image: list[int] = field(default_factory=list)
    image_logits: torch.Tensor | None = None  # VIP output [N]
    attn_scores: torch.Tensor | None = None  # VIP attention input [N, len(selected_layers) * heads]
    prompt_positions: torch.Tensor | None = None  # original positions of the P prompt tokens
    glimpse_position: torch.Tensor | None = None  # [3] / [1]
    survivor_positions: torch.Tensor | None = None  # positions fed to layers K+1.. (prompt survivors)
    survivor_index: torch.Tensor | None = None  # rows of the prompt that survived
    decode_positions: list[torch.Tensor] = field(default_factory=list)  # fed at each decode step
    layer_outputs: list[torch.Tensor] = field(default_factory=list)  # [P(+1), H] after layers 0..K
    prefill_logits: torch.Tensor | None = None  # [P', vocab] logits of the survivors


@torch.no_grad()
def glimpse_generate(model, prepared: PreparedPrompt, predictor: GlimpsePredictor | None,
                     max_new_tokens: int, keep_rule: KeepRule | None = None,
                     use_glimpse: bool = True, record_layers: bool = False) -> GlimpseResult:
    """Greedy tokens (no EOS stop) of one request under GlimpsePrune.

    ``predictor=None`` or ``use_glimpse=False`` (or a request without images, as the authors):
    plain inference through the same hand-run layers. ``keep_rule`` overrides the checkpoint's.
    ``record_layers`` keeps each layer's output hidden states (layers 0..K; every layer when plain).
    """
    tm = _TextModel(model, prepared.family)
    num_layers = len(tm.layers)
    embeds, positions = prepared.inputs_embeds, prepared.positions
    P = embeds.shape[0]
    active = use_glimpse and predictor is not None and prepared.image_index.numel() > 0
    result = GlimpseResult(tokens=[], keep=None, prompt_positions=positions)
    kv = SimpleKV()

    if not active:
        hidden = embeds
        cos_sin = tm.rope(hidden, positions)
        for idx in range(num_layers):
            hidden = tm.run_layer(idx, hidden, cos_sin, kv)
            if record_layers:
                result.layer_outputs.append(hidden)
        survivor_positions = positions
        result.survivor_index = torch.arange(P)
    else:
        cfg = predictor.config
        if cfg.family == "qwen2_5_vl" and not cfg.attn_fuse_global:
            raise ValueError("this reference implements the whole-image VIP (attn_fuse_global)")
        K = cfg.reduce_layer  # GlimpseConfig guarantees max(selected_layers) <= K
        # 1. the glimpse token: layer-0 input = its embedding, position = last position + 1
        glimpse = predictor.glimpse_embedding(0).to(embeds.dtype)  # [le_length, H]
        le_len = glimpse.shape[0]
        glimpse_pos = positions[:, -1:] + torch.arange(1, le_len + 1).view(1, -1)  # [3|1, le_len]
        result.glimpse_position = glimpse_pos[:, 0]
        hidden = torch.cat([embeds, glimpse])
        all_positions = torch.cat([positions, glimpse_pos], dim=1)
        cos_sin = tm.rope(hidden, all_positions)
        # 2. layers 0..K on all tokens, scores at the selected layers
        layer_scores = {}
        for idx in range(K + 1):
            if idx > 0:
                add = predictor.glimpse_embedding(idx)
                if add is not None:
                    hidden = hidden.clone()
                    hidden[P:] = hidden[P:] + add.to(hidden.dtype)
            query = tm.glimpse_query(idx, hidden, cos_sin) if idx in cfg.selected_layers else None
            hidden = tm.run_layer(idx, hidden, cos_sin, kv)
            if record_layers:
                result.layer_outputs.append(hidden)
            if query is not None:  # 3. the glimpse query at the last glimpse row vs. all keys
                layer_scores[idx] = glimpse_scores(query, kv.keys[idx][0], prepared.image_index,
                                                   cfg.use_attention_logits)
        attn = torch.stack([layer_scores[i] for i in cfg.selected_layers], dim=1).flatten(1)
        result.attn_scores = attn
        # 3b. the VIP and the keep rule over all image tokens of the request
        logits = predictor(attn, prepared.vision_feats, prepared.grid_hw)
        result.image_logits = logits
        rule = keep_rule or cfg.keep_rule
        single = prepared.grid_hw[0] if len(prepared.grid_hw) == 1 else None
        keep = rule(logits, single)
        result.keep = keep
        sizes = [h * w for h, w in prepared.grid_hw]
        result.kept_per_image = [int(m.sum()) for m in torch.split(keep, sizes)]
        # 4. drop the glimpse token and the pruned image tokens: hidden states, KV of 0..K, positions
        keep_rows = torch.ones(P, dtype=torch.bool)
        keep_rows[prepared.image_index] = keep
        rows = torch.nonzero(keep_rows).squeeze(-1)  # (the glimpse rows P.. are never kept)
        hidden = hidden[rows]
        for idx in range(K + 1):
            kv.keys[idx] = kv.keys[idx][:, :, rows]
            kv.values[idx] = kv.values[idx][:, :, rows]
        survivor_positions = positions[:, rows]  # ORIGINAL positions
        result.survivor_index = rows
        cos_sin = tm.rope(hidden, survivor_positions)
        for idx in range(K + 1, num_layers):
            hidden = tm.run_layer(idx, hidden, cos_sin, kv)

    result.survivor_positions = survivor_positions
    prefill_logits = tm.logits(hidden)
    result.prefill_logits = prefill_logits
    tokens = [int(prefill_logits[-1].argmax())]
    next_pos = positions[:, -1:] + 1  # the last prompt token's original position + 1
    for step in range(max_new_tokens - 1):
        pos = next_pos + step
        result.decode_positions.append(pos[:, 0])
        h = tm.embed(torch.tensor([tokens[-1]]))
        cs = tm.rope(h, pos)
        for idx in range(num_layers):
            h = tm.run_layer(idx, h, cs, kv)
        tokens.append(int(tm.logits(h)[-1].argmax()))
    result.tokens = tokens
    return result


#: How each family's request is prepared (the HF model's own input building).
PREPARE = {"qwen2_5_vl": prepare_qwen, "llava": prepare_llava}


@dataclass
class GlimpseReference:
    """One family's reference: the HF model (float32, eager attention), its processor and the
    GlimpsePrune modules of a checkpoint, loaded as the authors' code would."""

    family: str  # "qwen2_5_vl" or "llava"
    model: Any
    processor: Any
    predictor: GlimpsePredictor

    @classmethod
    def load(cls, family: str, model_path: str, checkpoint: str) -> GlimpseReference:
        from transformers import (
            AutoProcessor,
            LlavaForConditionalGeneration,
            Qwen2_5_VLForConditionalGeneration,
        )

        from vllm_glimpse.glimpse import load_glimpse_checkpoint

        model_cls = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                     "llava": LlavaForConditionalGeneration}[family]
        model = model_cls.from_pretrained(model_path, attn_implementation="eager").eval()
        predictor = load_glimpse_checkpoint(checkpoint, model.config, dtype=torch.float32).predictor
        return cls(family, model, AutoProcessor.from_pretrained(model_path), predictor)

    def generate(self, prompt: str, images, max_new_tokens: int,
                 keep_rule: KeepRule | None = None) -> tuple[GlimpseResult, PreparedPrompt]:
        """Greedy tokens with GlimpsePrune (:func:`glimpse_generate`), and the prepared prompt."""
        prepared = PREPARE[self.family](self.model, self.processor, prompt, images,
                                        self.predictor.config.selected_visual_layers)
        return glimpse_generate(self.model, prepared, self.predictor, max_new_tokens,
                                keep_rule=keep_rule), prepared
