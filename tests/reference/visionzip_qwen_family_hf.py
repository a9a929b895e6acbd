"""Independent reference of VisionZip on HF transformers' Qwen3-VL and Qwen2-VL.

Written from the authors' Qwen2.5-VL code (dvlab-research/VisionZip,
``Qwen2_5_VL/qwen2_5vl_visionzip.py``: ``Qwen2_5_VisionTransformerPretrainedModel.forward`` for
the score and keys, ``Qwen2_5_VLForConditionalGeneration.forward`` for selection, merge and
placement), carried over to the two ViTs, in their style (boolean masks, bmm, one-hot
assignment) on transformers' model classes. It imports nothing from vllm or vllm_glimpse.

Carried over as:

- scored block: the ViT's last full-attention block. Qwen2.5-VL's is
  ``max(fullatt_block_indexes)``, its last block; Qwen3-VL and Qwen2-VL have only full-attention
  blocks, so it is their last block. Their patches are already in merge-group order (no window
  permutation to undo).
- Qwen3-VL's DeepStack features (one per tap, rows aligned with the merger output) are selected
  with the same keep mask and merged with the same one-hot assignment as the merger output, and
  written into the same slots; the LLM adds the k-th to layer k's output at the image tokens
  (transformers' ``visual_pos_masks`` / ``deepstack_visual_embeds``).
- Placement, as the authors': each contextual token written over its target's slot, the image
  compacted with the keep mask (kept slots in raster order), positions compacted with it.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def vit_capture(visual, pixel_values, grid_thw):
    """Run the HF ViT (Qwen3-VL or Qwen2-VL) on one image. Returns the merger output [N, E] and
    the DeepStack features (list of [N, E]; empty for Qwen2-VL) in raster order, and the last
    block's post-RoPE query and key [heads, S, head_dim] (patches in merge-group order)."""
    block = visual.blocks[-1]
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["cos_sin"] = kwargs["position_embeddings"]

    hook = block.attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        out = visual(pixel_values, grid_thw=grid_thw)
    finally:
        hook.remove()
    attn = block.attn
    rotary = _apply_rotary_pos_emb_vision(visual)
    seq = captured["hidden"].shape[0]
    q, k, _ = attn.qkv(captured["hidden"]).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *captured["cos_sin"])
    deepstack = list(getattr(out, "deepstack_features", None) or [])
    return out.pooler_output, deepstack, q.transpose(0, 1), k.transpose(0, 1)


def _apply_rotary_pos_emb_vision(visual):
    if type(visual).__module__.endswith("qwen3_vl"):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    return apply_rotary_pos_emb_vision


@torch.no_grad()
def visionzip_image(visual, pixel_values, grid_thw, dominant_ratio, contextual_ratio):
    """VisionZip of one image, as the authors' Qwen code decides selection, merge and placement.

    Returns (features: [main [N, E], *deepstack [N, E]] the ViT outputs in raster order,
    select_mask [N] the slots the image keeps, contexual_input_idx [C] the slots the contextual
    tokens are written into, contextual_tokens: one [C, E] per feature (main first)).
    """
    image_embeds, deepstack, q, k = vit_capture(visual, pixel_values, grid_thw)
    features = [image_embeds, *deepstack]
    seq, unit = q.shape[1], visual.config.spatial_merge_size ** 2
    scaling = q.shape[-1] ** -0.5
    logits = torch.softmax(q @ k.transpose(1, 2) * scaling, dim=-1)  # one image: full S x S
    attn_logits = logits.mean(dim=0).sum(dim=0).view(seq // unit, unit).mean(dim=-1)
    attn_key = k.reshape(k.shape[0], seq // unit, unit, -1).mean(dim=2).mean(0)[None]  # [1, N, d]

    n = attn_logits.size(0)
    dominant_num = int(n * dominant_ratio)
    contextual_num = max(int(n * contextual_ratio), 1) if contextual_ratio > 0 else 0
    contextual_num = min(contextual_num, n - dominant_num)
    _, topk_indices = torch.topk(attn_logits, dominant_num)
    select_mask = torch.zeros(n, dtype=torch.bool)
    select_mask[topk_indices] = True
    contextual_mask = ~select_mask.clone()
    if contextual_num == 0:
        return features, select_mask, torch.empty(0, dtype=torch.long), [f[:0] for f in features]

    metric_filtered = attn_key[:, contextual_mask]
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    not_target = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, not_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(1, tokens_to_merge.shape[1], contextual_num,
                                 dtype=image_embeds.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)

    false_pos = (~select_mask).nonzero(as_tuple=True)[0]
    contexual_input_idx = false_pos[target_indices]
    select_mask[contexual_input_idx] = True

    contextual_tokens = []
    for feature in features:  # the main embedding, then each DeepStack feature: same rows
        hidden_states_filtered = feature[None][:, contextual_mask]
        aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2),
                                      hidden_states_filtered[:, not_target, :]) / counts
        contextual_tokens.append((hidden_states_filtered[:, target_indices, :] + aggregated_hidden)[0])
    return features, select_mask, contexual_input_idx, contextual_tokens


def image_sequence(feature, select_mask, contexual_input_idx, contextual_tokens):
    """One feature of one image as the LLM reads it: contextual tokens over their targets'
    slots, then compacted with the keep mask (raster order). Returns (tokens, slots)."""
    embeds = feature.clone()
    embeds[contexual_input_idx] = contextual_tokens
    return embeds[select_mask], torch.nonzero(select_mask).squeeze(-1)


@torch.no_grad()
def prefill(model, processor, prompt, images, dominant_ratio, contextual_ratio):
    """The pruned LLM input of HF Qwen3-VL / Qwen2-VL, built like the authors' forward: the
    unpruned prompt's embeddings and M-RoPE positions (``get_rope_index``), each image's span
    overwritten (contextual tokens into their targets' slots), then embeddings, positions and
    DeepStack features compacted with the keep mask.

    Returns (inputs_embeds [L', E], position_ids [3, L'], visual_pos_masks [L'] (image tokens),
    deepstack [list of [image tokens, E]], per image: its slots in the order kept).
    """
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    input_ids = inputs.input_ids
    lm = model.model
    if images:
        position_ids, _ = lm.get_rope_index(input_ids, inputs.mm_token_type_ids,
                                            inputs.image_grid_thw)
    else:
        position_ids = torch.arange(input_ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    inputs_embeds = lm.get_input_embeddings()(input_ids)[0].clone()  # [L, E]
    is_image = input_ids[0] == model.config.image_token_id
    img_mask = torch.ones(input_ids.shape[1], dtype=torch.bool)
    num_deepstack = len(getattr(lm.visual, "deepstack_visual_indexes", None) or [])
    deepstack_full = [torch.zeros_like(inputs_embeds) for _ in range(num_deepstack)]
    image_starts = torch.nonzero(is_image).squeeze(-1).tolist()
    slots, first, pixel_offset = [], 0, 0
    for grid in (inputs.image_grid_thw if images else []):
        grid = grid[None]
        num_patches = int(grid.prod())
        num_image_tokens = num_patches // lm.visual.config.spatial_merge_size ** 2
        first = next(i for i in image_starts if i >= first)
        span = slice(first, first + num_image_tokens)
        features, select_mask, contexual_input_idx, contextual_tokens = visionzip_image(
            lm.visual, inputs.pixel_values[pixel_offset:pixel_offset + num_patches], grid,
            dominant_ratio, contextual_ratio)
        for full, feature, merged in zip([inputs_embeds, *deepstack_full], features,
                                         contextual_tokens):
            full[span] = feature
            full[contexual_input_idx + first] = merged
        img_mask[span] = select_mask
        slots.append(torch.nonzero(select_mask).squeeze(-1))
        first += num_image_tokens
        pixel_offset += num_patches
    visual_pos_masks = is_image[img_mask]
    deepstack = [d[img_mask][visual_pos_masks] for d in deepstack_full]
    return (inputs_embeds[img_mask], position_ids[:, 0, img_mask], visual_pos_masks, deepstack,
            slots)


@torch.no_grad()
def greedy(model, inputs_embeds, position_ids, visual_pos_masks, deepstack, max_new_tokens):
    """Greedy tokens of the HF LLM from a prefill's embeddings [L', E], M-RoPE positions
    [3, L'] and DeepStack features; decoding continues at the largest position + 1 (the
    unpruned prompt's next position), no stopping on EOS (vLLM runs ignore_eos)."""
    lm = model.model
    extra = {}
    if deepstack and bool(visual_pos_masks.any()):
        extra = dict(visual_pos_masks=visual_pos_masks[None], deepstack_visual_embeds=deepstack)
    out = lm.language_model(inputs_embeds=inputs_embeds[None], position_ids=position_ids[:, None],
                            use_cache=True, **extra)
    next_position = int(position_ids.max()) + 1
    tokens = [int(model.lm_head(out.last_hidden_state[:, -1]).argmax())]
    past = out.past_key_values
    for step in range(max_new_tokens - 1):
        step_position = torch.full((3, 1, 1), next_position + step)
        out = lm.language_model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=step_position,
                                past_key_values=past, use_cache=True)
        past = out.past_key_values
        tokens.append(int(model.lm_head(out.last_hidden_state[:, -1]).argmax()))
    return tokens


def generate(model, processor, prompt, images, dominant_ratio, contextual_ratio, max_new_tokens):
    """Greedy tokens of HF Qwen3-VL / Qwen2-VL with VisionZip (:func:`prefill`, :func:`greedy`)."""
    inputs_embeds, position_ids, visual_pos_masks, deepstack, _ = prefill(
        model, processor, prompt, images, dominant_ratio, contextual_ratio)
    return greedy(model, inputs_embeds, position_ids, visual_pos_masks, deepstack, max_new_tokens)
