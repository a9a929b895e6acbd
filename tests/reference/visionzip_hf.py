"""Independent reference of VisionZip on HF transformers' model classes.

Written from the authors' code (dvlab-research/VisionZip: clip_encoder.py, llava_arch.py for
LLaVA; Qwen2_5_VL/qwen2_5vl_visionzip.py for Qwen2.5-VL) in their style (boolean masks, bmm,
one-hot assignment), on transformers' eager attention probabilities and hidden states. It
imports nothing from vllm or vllm_glimpse: it is the oracle the engine is compared against.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def llava_visionzip_features(vision_tower, pixel_values, dominant, contextual, feature_layer=-2):
    """CLIP features after VisionZip, [B, dominant + contextual, E], and the kept indices
    (CLS = 0 first, then the dominant patches, as the authors' ``all_indices``)."""
    layer = vision_tower.encoder.layers[feature_layer]
    captured = {}
    hook = layer.self_attn.k_proj.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("keys", out))
    try:
        out = vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()
    attn_weights = out.attentions[feature_layer]  # [B, heads, S, S] softmax probabilities
    hidden_states = out.hidden_states[feature_layer]  # output of that layer
    batch, seq, _ = hidden_states.shape
    heads = attn_weights.shape[1]
    metric = captured["keys"].view(batch, seq, heads, -1).mean(2)  # head-mean keys

    dominant_num = dominant - 1  # the authors pass dominant - 1 and prepend CLS
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(batch, 1, dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(batch, dominant, -1)
    if contextual == 0:
        return dominant_tokens, all_indices

    rest = seq - dominant
    metric_filtered = metric[mask].view(batch, rest, metric.shape[2])
    hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(batch, rest, -1)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, rest // contextual)
    target_indices = torch.arange(0, rest, step)[:contextual]
    target_tokens = metric_normalized[:, target_indices, :]
    not_target = ~torch.isin(torch.arange(rest), target_indices)
    tokens_to_merge = metric_normalized[:, not_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(batch, tokens_to_merge.shape[1], contextual,
                                 dtype=hidden_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, not_target, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


@torch.no_grad()
def greedy_from_embeds(model, inputs_embeds, max_new_tokens):
    """Plain greedy decoding with the KV cache, no stopping on EOS (vLLM runs ignore_eos)."""
    out = model(inputs_embeds=inputs_embeds, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    past = out.past_key_values
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


@torch.no_grad()
def llava_generate(model, processor, prompt, images, dominant, contextual, max_new_tokens,
                   add_special_tokens=True):
    """Greedy tokens of HF LLaVA-1.5 with VisionZip: each ``<image>`` of the prompt becomes
    dominant + contextual embeddings (projector of the VisionZip features), 1-D positions
    contiguous as the LLaVA code builds them. ``add_special_tokens=False`` tokenizes as vLLM's
    chat endpoint does (the chat template is trusted to hold any BOS)."""
    config = model.config
    ids = processor.tokenizer(prompt, return_tensors="pt",
                              add_special_tokens=add_special_tokens).input_ids[0]
    image_token = config.image_token_index
    num_tokens = dominant + contextual
    pieces, image_slots = [], []
    for tok in ids.tolist():
        if tok == image_token:
            image_slots.append(sum(len(p) for p in pieces))
            pieces.append([image_token] * num_tokens)
        else:
            pieces.append([tok])
    expanded = torch.tensor([t for p in pieces for t in p])
    embeds = model.get_input_embeddings()(expanded).clone()
    if images:
        pixel_values = processor.image_processor(images, return_tensors="pt").pixel_values
        features, _ = llava_visionzip_features(model.model.vision_tower, pixel_values,
                                               dominant, contextual, config.vision_feature_layer)
        projected = model.model.multi_modal_projector(features)
        for slot, image_embeds in zip(image_slots, projected):
            embeds[slot:slot + num_tokens] = image_embeds
    return greedy_from_embeds(model, embeds[None], max_new_tokens)


@torch.no_grad()
def llava_next_visionzip_embeds(model, pixel_values, image_size, dominant, contextual):
    """Embeddings of one LLaVA-NeXT image under VisionZip, in the authors' order: base image
    [CLS, dominant, contextual]; then the crops' dominant patches restored into the crop grid and
    read in raster order (``restore_image_features_sorted``), then each crop's CLS, then each
    crop's contextual tokens. pixel_values [n_crops + 1, 3, H, W] (base first)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    num_patch_height, num_patch_width = get_anyres_image_grid_shape(
        image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    pixel_values = pixel_values[: 1 + num_patch_height * num_patch_width]
    features, keep_idx = llava_visionzip_features(
        model.model.vision_tower, pixel_values, dominant, contextual, config.vision_feature_layer)
    image_feature = model.model.multi_modal_projector(features)
    base, crops, crop_keep = image_feature[0], image_feature[1:], keep_idx[1:]
    if crops.shape[0] == 0:
        return base
    num_img, _, dim = crops.shape
    keep_sorted = crop_keep.sort(dim=1).values[:, 1:] - 1
    restored = torch.zeros(num_img, side * side, dim)
    mask = torch.zeros(num_img, side * side, dtype=torch.bool)
    mask.scatter_(1, keep_sorted, True)
    restored[mask] = crops[:, 1:dominant].reshape(-1, dim)
    restored = restored.view(num_patch_height, num_patch_width, side, side, dim)
    restored = restored.permute(0, 2, 1, 3, 4).reshape(num_patch_height * side, num_patch_width * side, dim)
    mask = mask.view(num_patch_height, num_patch_width, side, side).permute(0, 2, 1, 3)
    mask = mask.reshape(num_patch_height * side, num_patch_width * side)
    selected = restored[mask]
    return torch.cat([base, selected, crops[:, 0], crops[:, dominant:].reshape(-1, dim)])


@torch.no_grad()
def llava_next_generate(model, processor, prompt, images, dominant, contextual, max_new_tokens):
    """Greedy tokens of HF LLaVA-NeXT with VisionZip per crop."""
    config = model.config
    ids = processor.tokenizer(prompt, return_tensors="pt").input_ids[0].tolist()
    image_embeds = []
    if images:
        processed = processor.image_processor(images, return_tensors="pt")
        for pixel_values, size in zip(processed.pixel_values, processed.image_sizes.tolist()):
            image_embeds.append(
                llava_next_visionzip_embeds(model, pixel_values, size, dominant, contextual))
    pieces, k = [], 0
    text_embed = model.get_input_embeddings()
    for tok in ids:
        if tok == config.image_token_index:
            pieces.append(image_embeds[k])
            k += 1
        else:
            pieces.append(text_embed(torch.tensor([tok])))
    return greedy_from_embeds(model, torch.cat(pieces)[None], max_new_tokens)


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL (authors' Qwen2_5_VL/qwen2_5vl_visionzip.py: batch size 1, post-merger selection)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def qwen_vit_capture(visual, pixel_values, grid_thw):
    """Run the HF ViT on one image; return its merger output [N, E] (raster order), the last
    full-attention block's post-RoPE query and key [heads, S, head_dim] (window order), and the
    permutation from window order back to raster order of the merged tokens."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    block = visual.blocks[max(visual.config.fullatt_block_indexes)]
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["cos_sin"] = kwargs["position_embeddings"]

    hook = block.attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        image_embeds = visual(pixel_values, grid_thw=grid_thw).pooler_output
    finally:
        hook.remove()
    attn = block.attn
    seq = captured["hidden"].shape[0]
    q, k, _ = attn.qkv(captured["hidden"]).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["cos_sin"])
    window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size,
                                              visual.window_size, visual.patch_size)
    return image_embeds, q.transpose(0, 1), k.transpose(0, 1), torch.argsort(window_index)


@torch.no_grad()
def qwen_visionzip_image(visual, pixel_values, grid_thw, dominant_ratio, contextual_ratio):
    """VisionZip of one Qwen2.5-VL image on the HF ViT, step by step as the authors' Qwen code
    decides selection, merge and placement (``Qwen2_5_VL/qwen2_5vl_visionzip.py`` of
    dvlab-research/VisionZip, release of 2025-05-26: ``Qwen2_5_VLForConditionalGeneration.forward``,
    the ``if select_pixel:`` block; their variable names are kept).

    Returns (image_embeds [N, E] the merger output in raster order, select_mask [N] the slots the
    image keeps, contexual_input_idx [C] the slots the contextual tokens are written into,
    contextual_tokens [C, E]). :func:`qwen_image_sequence` turns them into what the LLM reads.

    Score (their ``Qwen2_5_VisionTransformerPretrainedModel.forward``): the softmax attention of
    the scored block, mean over heads, summed over queries, averaged over the 2x2 merge group, in
    raster order. Keys: that block's post-RoPE keys averaged over the merge group, then heads.
    """
    image_embeds, q, k, reverse_indices = qwen_vit_capture(visual, pixel_values, grid_thw)
    seq, unit = q.shape[1], visual.spatial_merge_unit
    scaling = q.shape[-1] ** -0.5
    logits = torch.softmax(q @ k.transpose(1, 2) * scaling, dim=-1)  # one image: full S x S
    attn_logits = logits.mean(dim=0).sum(dim=0).view(seq // unit, unit).mean(dim=-1)
    attn_logits = attn_logits[reverse_indices]
    attn_key = k.reshape(k.shape[0], seq // unit, unit, -1).mean(dim=2)[:, reverse_indices].mean(0)
    attn_key = attn_key.unsqueeze(0)  # [1, N, head_dim]

    n = attn_logits.size(0)
    # Theirs: int(0.65 * N) and max(int(0.05 * N), 1); the project's settings also allow no
    # contextual token (ratio 0) and never keep more than N tokens.
    dominant_num = int(n * dominant_ratio)
    contextual_num = max(int(n * contextual_ratio), 1) if contextual_ratio > 0 else 0
    contextual_num = min(contextual_num, n - dominant_num)
    _, topk_indices = torch.topk(attn_logits, dominant_num)

    mask = torch.zeros_like(attn_logits, dtype=torch.bool)
    mask[topk_indices] = True
    contextual_mask = ~mask
    select_mask = torch.zeros_like(attn_logits, dtype=torch.bool)
    select_mask[topk_indices] = True
    if contextual_num == 0:
        empty = torch.empty(0, dtype=torch.long)
        return image_embeds, select_mask, empty, image_embeds[:0]
    metric_filtered = attn_key[:, contextual_mask]
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)

    # Contextual visual tokens: uniformly strided targets among the non-dominant tokens.
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    not_target = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, not_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                 dtype=image_embeds.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)

    # Placement: the targets' slots join the kept slots, and the contextual tokens go into them.
    false_pos = (~select_mask).nonzero(as_tuple=True)[0]
    select_mask[false_pos[target_indices]] = True
    contexual_input_idx = false_pos[target_indices]

    hidden_states_filtered = image_embeds[None][:, contextual_mask]
    hidden_to_merge = hidden_states_filtered[:, not_target, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return image_embeds, select_mask, contexual_input_idx, contextual_tokens[0]


def qwen_image_sequence(image_embeds, select_mask, contexual_input_idx, contextual_tokens):
    """One image's part of the LLM input as the authors build it: the contextual tokens written
    over their targets' embeddings (``inputs_embeds[:, contexual_input_idx] = contextual_tokens``),
    then the image compacted by the keep mask (``inputs_embeds[:, img_mask]``), so the kept slots
    stay in raster order. Returns (tokens [D + C, E], their slots [D + C])."""
    embeds = image_embeds.clone()
    embeds[contexual_input_idx] = contextual_tokens
    return embeds[select_mask], torch.nonzero(select_mask).squeeze(-1)


@torch.no_grad()
def qwen_prefill(model, processor, prompt, images, dominant_ratio, contextual_ratio):
    """The LLM input of HF Qwen2.5-VL with VisionZip, built as the authors' forward builds it.

    The unpruned prompt's embeddings (image embeddings scattered into the image tokens) and
    M-RoPE positions (``get_rope_index``); per image, the keep mask over its span is its
    ``select_mask`` and its contextual tokens overwrite their targets' embeddings; then
    embeddings and positions are compacted with the keep mask together, so every kept token
    keeps its unpruned position (a contextual token its target's) and text positions are those
    of the unpruned prompt. Their code handles one image span per prompt (``first:last+1``);
    here the same is done for each image's span.

    Returns (inputs_embeds [L', E], position_ids [3, L'], image_of [L'] the image a token belongs
    to (-1 for text), is_contextual [L'] bool).
    """
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    input_ids = inputs.input_ids
    lm = model.model
    if images:
        position_ids, _ = lm.get_rope_index(input_ids, inputs.mm_token_type_ids,
                                            inputs.image_grid_thw)
    else:
        position_ids = torch.arange(input_ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    inputs_embeds = lm.get_input_embeddings()(input_ids).clone()  # [1, L, E]
    img_mask = torch.ones(input_ids.shape[1], dtype=torch.bool)  # text: always kept
    is_contextual = torch.zeros(input_ids.shape[1], dtype=torch.bool)
    image_of = torch.full((input_ids.shape[1],), -1)
    image_starts = torch.nonzero(input_ids[0] == model.config.image_token_id).squeeze(-1).tolist()
    first, pixel_offset = 0, 0
    for k, grid in enumerate(inputs.image_grid_thw if images else []):
        grid = grid[None]
        num_patches = int(grid.prod())
        num_image_tokens = num_patches // lm.visual.spatial_merge_unit
        first = next(i for i in image_starts if i >= first)  # this image's first token
        last = first + num_image_tokens - 1
        image_embeds, select_mask, contexual_input_idx, contextual_tokens = qwen_visionzip_image(
            lm.visual, inputs.pixel_values[pixel_offset:pixel_offset + num_patches], grid,
            dominant_ratio, contextual_ratio)
        inputs_embeds[0, first:last + 1] = image_embeds  # their masked_scatter of image_embeds
        img_mask[first:last + 1] = select_mask
        inputs_embeds[0, contexual_input_idx + first] = contextual_tokens
        is_contextual[contexual_input_idx + first] = True
        image_of[first:last + 1] = k
        first = last + 1
        pixel_offset += num_patches
    position_ids = position_ids[:, :, img_mask]
    inputs_embeds = inputs_embeds[:, img_mask]
    return inputs_embeds[0], position_ids[:, 0], image_of[img_mask], is_contextual[img_mask]


@torch.no_grad()
def qwen_greedy(model, inputs_embeds, position_ids, max_new_tokens):
    """Greedy tokens of the HF Qwen2.5-VL LLM from a prefill's embeddings [L', E] and M-RoPE
    positions [3, L']; decoding continues from the largest position + 1 (the unpruned prompt's
    next position: the authors' ``rope_deltas`` come from the unpruned prompt)."""
    lm = model.model

    def logits(hidden):
        return model.lm_head(hidden[:, -1])

    out = lm.language_model(inputs_embeds=inputs_embeds[None], position_ids=position_ids[:, None],
                            use_cache=True)
    next_position = int(position_ids.max()) + 1
    tokens = [int(logits(out.last_hidden_state).argmax())]
    past = out.past_key_values
    for step in range(max_new_tokens - 1):
        step_position = torch.full((3, 1, 1), next_position + step)
        out = lm.language_model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=step_position,
                                past_key_values=past, use_cache=True)
        past = out.past_key_values
        tokens.append(int(logits(out.last_hidden_state).argmax()))
    return tokens


@torch.no_grad()
def qwen_generate(model, processor, prompt, images, dominant_ratio, contextual_ratio, max_new_tokens):
    """Greedy tokens of HF Qwen2.5-VL with VisionZip (:func:`qwen_prefill`, :func:`qwen_greedy`)."""
    inputs_embeds, position_ids, _, _ = qwen_prefill(model, processor, prompt, images,
                                                  dominant_ratio, contextual_ratio)
    return qwen_greedy(model, inputs_embeds, position_ids, max_new_tokens)
