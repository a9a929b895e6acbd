"""Our variant of vLLM's Qwen2-VL: VisionZip on the ViT output.

ProcessingInfo and DummyInputsBuilder (vLLM's) → MultiModalProcessor (placeholder counts from the
VisionZip ratios, per-request budgets, hashes salted with the settings) → Model (the ViT run
collecting what VisionZip reads; kept tokens at their original M-RoPE positions). The pieces
shared with Qwen3-VL live in ``vllm_glimpse.models.qwen3_vl`` (the model mixin) and
``vllm_glimpse.models.qwen_visionzip`` (the processor mixin, selection, positions); with method
``none`` every piece defers to vLLM's own.

Scored block: Qwen2-VL's ViT has no window attention, every block is a full-attention block, so
VisionZip's Qwen2.5-VL rule (the last full-attention block, ``max(fullatt_block_indexes)``, which
is the ViT's last block there too) picks the last block, ``depth - 1``. Its patches are grouped
by 2x2 merge group in raster order of the merged tokens (no window reordering). Videos are not
pruned; a video is one run of tokens at (t, row, column) from its start.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_glimpse.models.qwen3_vl import QwenFamilyVisionZipModelMixin
from vllm_glimpse.models.qwen_visionzip import (
    QwenFamilyPruningProcessorMixin,
    media_positions,
    merged_scores_and_keys,
)
from vllm_glimpse.parallel import mean_over_head_shards


class VisionZipQwen2VLMultiModalProcessor(QwenFamilyPruningProcessorMixin,
                                          Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor with the Qwen family's pruning pieces (all in the mixin)."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class VisionZipQwen2VLForConditionalGeneration(QwenFamilyVisionZipModelMixin,
                                             Qwen2VLForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_visionzip(vllm_config)

    def _vit_with_visionzip_inputs(self, pixel_values, grid_thw):
        return qwen2_vit_with_visionzip_inputs(self.visual, pixel_values, grid_thw)

    def _unpruned_mrope_input_positions(self, input_tokens, mm_features):
        return Qwen2VLForConditionalGeneration.get_mrope_input_positions(
            self, input_tokens, mm_features)

    def _video_local_positions(self, t: int, h: int, w: int) -> torch.Tensor:
        # The temporal step as vLLM's iter_mm_grid_thw computes it for Qwen2-VL videos (no
        # second_per_grid_ts reaches the model: 1 second per grid step).
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        return media_positions(t, h, w, tokens_per_second)


def _rotated_query_key(block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The block's post-RoPE query and key [S, heads of this rank, head_dim], as its attention
    computes them. Qwen2-VL's ``qkv`` is not split per rank into [q | k | v]: under tensor
    parallelism the attention gathers it and takes each rank's heads (``split_qkv``), so do we.
    Not the shared ``qwen_visionzip.rotated_query_key``: that one views a rank's ``qkv`` output
    as [q | k | v] of its own heads (``QKVParallelLinear``: Qwen2.5-VL, Qwen3-VL); here a rank's
    output is a slice of the whole [q | k | v], and the two agree only without tensor parallelism."""
    attn = block.attn
    qkv, _ = attn.qkv(block.norm1(hidden))  # [S, 1, 3 * heads * head_dim] (this rank's shard)
    query, key, _ = attn.split_qkv(qkv)  # [S, 1, heads, head_dim] each
    qk = torch.cat([query, key], dim=1).transpose(0, 1)  # [2, S, heads, head_dim]
    query, key = attn.apply_rotary_emb(qk, cos, sin).unbind(0)
    return query, key


def qwen2_vit_with_visionzip_inputs(
    visual, pixel_values: torch.Tensor, grid_thw: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run vLLM's Qwen2-VL ViT as ``Qwen2VisionTransformer.forward`` does and collect what
    VisionZip reads: the merger output [N, E] in raster order, the attention each token
    receives in the last block (softmax averaged over heads, summed over its image's queries,
    averaged over its 2x2 merge group) [N], and that block's post-RoPE keys averaged over the
    merge group and over heads [N, head_dim]. The blocks are compile-wrapped, so hooks on them
    do not fire: this loop runs them and recomputes the last block's query and key."""
    meta = visual.prepare_encoder_metadata(grid_thw)
    hidden = visual.patch_embed(visual.input_norm(pixel_values.to(device=visual.device),
                                                  visual.dtype)).unsqueeze(1)
    cos, sin = meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"]
    *earlier, last = visual.blocks
    for block in earlier:
        hidden = block(hidden, cu_seqlens=meta["cu_seqlens"], rotary_pos_emb_cos=cos,
                       rotary_pos_emb_sin=sin, max_seqlen=meta["max_seqlen"])
    query, key = _rotated_query_key(last, hidden, cos, sin)
    hidden = last(hidden, cu_seqlens=meta["cu_seqlens"], rotary_pos_emb_cos=cos,
                  rotary_pos_emb_sin=sin, max_seqlen=meta["max_seqlen"])
    merged = visual.merger(hidden)
    sizes = [t * h * w for t, h, w in grid_thw]
    in_order = torch.arange(merged.shape[0], device=merged.device)
    merge_unit = visual.spatial_merge_size**2
    scores, keys = merged_scores_and_keys(query, key, sizes, merge_unit, in_order)
    # Tensor parallel (mm_encoder_tp_mode "weights"): this rank's means cover its heads only.
    return merged, *mean_over_head_shards([scores, keys], heads_split=last.attn.tp_size > 1)
