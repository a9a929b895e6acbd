"""Independent reference of VisionZip on HF transformers' model classes.

Written from the authors' code (dvlab-research/VisionZip: clip_encoder.py, llava_arch.py) in
their style (boolean masks, bmm, one-hot assignment), on transformers' eager attention
probabilities and hidden states. It imports nothing from vllm or vllm_glimpse: it is the oracle
the engine is compared against.
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
def llava_generate(model, processor, prompt, images, dominant, contextual, max_new_tokens):
    """Greedy tokens of HF LLaVA-1.5 with VisionZip: each ``<image>`` of the prompt becomes
    dominant + contextual embeddings (projector of the VisionZip features), 1-D positions
    contiguous as the LLaVA code builds them."""
    config = model.config
    ids = processor.tokenizer(prompt, return_tensors="pt").input_ids[0]
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
