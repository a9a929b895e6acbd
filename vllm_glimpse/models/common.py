"""Pieces shared by our model variants."""

from __future__ import annotations

import hashlib
import json

import torch

from vllm_glimpse.kernels.visionzip_triton import attention_received_scores
from vllm_glimpse.settings import pruning_config_of


class PruningHashMixin:
    """Salt multimodal hashes with the pruning settings.

    vLLM keys its processor cache and encoder cache by the item's hash, which covers the image and
    the request's processor kwargs but not ``hf_overrides`` (DESIGN.md §3). Without the salt an
    engine could hand out embeddings computed under other pruning settings (or none) for the
    same image. Method ``none`` leaves hashes as vLLM computes them.
    """

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        config = pruning_config_of(self.info.get_hf_config())
        if config.method == "none":
            return hashes
        salt = json.dumps(config.to_dict(), sort_keys=True)
        return {
            modality: [hashlib.sha256(f"{h}|vllm_glimpse={salt}".encode()).hexdigest() for h in hs]
            for modality, hs in hashes.items()
        }


def clip_tower_with_visionzip_inputs(
    vision_tower, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run vLLM's CLIP tower (built up to LLaVA's feature layer -2) and collect what VisionZip
    reads from that last layer: its output hidden states [B, S, E] (CLS first), the CLS query's
    softmax attention over all S keys summed over heads [B, S], and the head-mean keys
    [B, S, head_dim] (pre-scale ``k_proj`` output, as the authors' ``CLIPAttention_forward``
    returns ``raw_key_states.mean(1)``).

    vLLM's CLIP attention returns no probabilities, so the CLS row is recomputed from the
    layer's own ``qkv_proj`` output: one [heads, S] row per image, cheap next to the layer.
    """
    vision_model = vision_tower.vision_model
    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values.to(vision_tower.dtype)))
    *earlier, last = vision_model.encoder.layers
    for layer in earlier:
        hidden = layer(hidden)
    attn = last.self_attn
    qkv, _ = attn.qkv_proj(last.layer_norm1(hidden))
    query, key, _ = qkv.chunk(3, dim=-1)
    batch, seq, _ = key.shape
    heads, head_dim = attn.num_heads_per_partition, attn.head_dim
    key = key.reshape(batch, seq, heads, head_dim)
    cls_query = query[:, :1].reshape(batch, 1, heads, head_dim)
    # The authors sum the CLS row of the softmax attention over heads.
    cls_scores = torch.stack([
        attention_received_scores(cls_query[i], key[i], attn.scale, reduce="sum")
        for i in range(batch)
    ])
    return last(hidden), cls_scores, key.mean(dim=2)
