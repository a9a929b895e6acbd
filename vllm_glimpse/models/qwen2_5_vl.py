"""Our variant of vLLM's Qwen2.5-VL: VisionZip on the ViT output.

ProcessingInfo (vLLM's) → MultiModalProcessor (each image's placeholder count from the VisionZip
ratios, hashes salted with the settings) → Model (runs the ViT collecting what VisionZip reads,
keeps D + C tokens per image at their original M-RoPE positions). With method ``none`` every
piece defers to vLLM's own.

Positions. Qwen2.5-VL gives image tokens 3-D (t, h, w) M-RoPE positions. After pruning, each kept
token keeps the position it had in the unpruned layout, a contextual token sits at its target's
position, and the text after the image continues where it would have without pruning.
``get_mrope_input_positions`` runs when a request arrives, before its images are encoded, so it
cannot know which tokens survive: it places all text exactly (each image advances the position
by its unpruned extent) and gives image tokens a provisional position. The embeddings carry 3
extra channels, each token's image-local (t, h, w); the runner hands them to
``recompute_mrope_positions`` in the step that gathers them (switched on for this model by
``vllm_glimpse.patches.enable_mrope_recompute_for_pruned_images``), which strips them and writes
the image tokens' final positions.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.utils import cast_overflow_tensors
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_glimpse.models.common import GlimpseTokenMixin, image_budgets
from vllm_glimpse.models.glimpse_lm import GlimpseModelMixin
from vllm_glimpse.models.qwen_visionzip import (
    QwenFamilyPruningProcessorMixin,
    QwenFamilyVisionZipPositionsMixin,
    media_extent,
    media_positions,
    merged_scores_and_keys,
    rotated_query_key,
    visionzip_per_image,
)
from vllm_glimpse.parallel import mean_over_head_shards
from vllm_glimpse.settings import PruningSettingsError


class PruningQwen2_5_VLMultiModalProcessor(
    GlimpseTokenMixin, QwenFamilyPruningProcessorMixin, Qwen2_5_VLMultiModalProcessor
):
    """vLLM's Qwen2.5-VL processor with the Qwen family's pruning pieces (placeholder counts,
    per-request budgets, hashes, the aspect-ratio check) and, under GlimpsePrune, the glimpse
    token appended to each prompt with images."""


@MULTIMODAL_REGISTRY.register_processor(
    PruningQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PruningQwen2_5_VLForConditionalGeneration(
    GlimpseModelMixin, QwenFamilyVisionZipPositionsMixin, Qwen2_5_VLForConditionalGeneration
):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_glimpse(vllm_config)
        self._init_visionzip(vllm_config)

    # ---- embeddings ------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object):
        if self.glimpse_enabled:
            return self._glimpse_embed_multimodal(**kwargs)
        if self.visionzip_ratios is None:
            return super().embed_multimodal(**kwargs)
        budgets = image_budgets(kwargs)  # per image: the request's ratios
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                embeddings += self._visionzip_images(inputs, budgets)
            else:  # videos are not pruned; they carry their positions like the images do
                embeddings += self._videos_with_positions(inputs)
        return embeddings

    # ---- GlimpsePrune: vision conditions ride along with the image embeddings --------------------

    def _glimpse_embed_multimodal(self, **kwargs: object):
        image_budgets(kwargs)  # drops our processor fields (the runner reads the keep rule)
        layers = self.glimpse_checkpoint.config.selected_visual_layers
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                if inputs["type"] != "pixel_values":
                    raise PruningSettingsError(
                        "GlimpsePrune on Qwen2.5-VL needs pixel images (it reads the ViT's block "
                        "outputs); precomputed image embeddings cannot be pruned")
                grid_thw = inputs["image_grid_thw"].tolist()
                merged, pooled = qwen_vit_with_block_outputs(
                    self.visual, inputs["pixel_values"], grid_thw, layers)
                conditions = torch.cat([pooled[i] for i in layers], dim=-1)
                merge = self.visual.spatial_merge_size
                sizes = [t * h * w // merge**2 for t, h, w in grid_thw]
                embeddings += self._with_conditions(merged.split(sizes), conditions.split(sizes))
            else:  # videos are not pruned
                embeddings += self._without_conditions(self._process_video_input(inputs))
        return embeddings

    def glimpse_image_grid(self, mm_feature) -> tuple[int, int]:
        _, h, w = mm_feature.data["image_grid_thw"].data.tolist()
        merge = self.config.vision_config.spatial_merge_size
        return h // merge, w // merge

    def _glimpse_text_model(self):
        return self.language_model.model

    def _glimpse_vision_layers_available(self) -> int:
        return len(self.visual.blocks)


    def _visionzip_images(self, image_input, budgets=None) -> tuple[torch.Tensor, ...]:
        grid_thw = image_input["image_grid_thw"].tolist()
        budgets = budgets or [self.visionzip_ratios] * len(grid_thw)
        merged, scores, keys = qwen_vit_with_visionzip_inputs(
            self.visual, image_input["pixel_values"], grid_thw)
        return visionzip_per_image(
            merged, scores, keys, grid_thw, self.visual.spatial_merge_size, budgets)

    def _videos_with_positions(self, video_input) -> tuple[torch.Tensor, ...]:
        merge = self.visual.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = video_input.get("second_per_grid_ts")
        out = []
        for i, (emb, (t, h, w)) in enumerate(
            zip(self._process_video_input(video_input), video_input["video_grid_thw"].tolist())
        ):
            # The temporal step as get_mrope_input_positions computes it for videos.
            t_factor = (float(seconds[i]) if seconds is not None else 1.0) * tokens_per_second
            positions = media_positions(t, h // merge, w // merge, t_factor).to(emb.device)
            out.append(torch.cat([emb, positions.to(emb.dtype)], dim=1))
        return tuple(out)

    # ---- positions --------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.visionzip_ratios is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        positions = np.empty((3, len(input_tokens)), dtype=np.int64)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        next_position, start = 0, 0
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(features)):
            positions[:, start:offset] = np.arange(offset - start) + next_position
            next_position += offset - start
            # Provisional: the runner re-places these once the image is encoded.
            end = offset + feature.mm_position.length
            positions[:, offset:end] = next_position
            next_position += media_extent(t, h, w, t_factor)
            start = end
        positions[:, start:] = np.arange(len(input_tokens) - start) + next_position
        delta = int(positions.max()) + 1 - len(input_tokens) if len(input_tokens) else 0
        return torch.from_numpy(positions), delta


# --------------------------------------------------------------------------------------------
# The ViT with VisionZip's inputs
# --------------------------------------------------------------------------------------------


def qwen_vit_with_visionzip_inputs(
    visual, pixel_values: torch.Tensor, grid_thw: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run vLLM's Qwen2.5-VL ViT and collect what VisionZip reads (docs/design.md §2).

    Returns, per post-merger token of all images, in raster order: the merger output [N, E];
    the score, the attention the token receives in the last full-attention block (softmax
    probabilities averaged over heads, summed over all queries of its image, averaged over its
    2x2 merge group) [N]; and the keys of that block (post-RoPE, averaged over the merge group
    and over heads) [N, head_dim].

    The blocks are compile-wrapped, so hooks on them do not fire (docs/design.md §3): this runs the
    blocks itself, as ``Qwen2_5_VisionTransformer.forward`` does, and recomputes the scoring
    block's query and key from its own ``qkv`` (one extra projection, small next to attention).
    """
    scoring_block = max(visual.fullatt_block_indexes)
    captured = {}

    def capture(index, block, hidden, cos, sin):
        if index == scoring_block:
            captured["qk"] = rotated_query_key(block, hidden, cos, sin)

    hidden, meta = _run_vit_blocks(visual, pixel_values, grid_thw, before_block=capture)
    query, key = captured["qk"]
    reverse = meta["reverse_indices"]
    merged = visual.merger(hidden)[reverse]
    sizes = [t * h * w for t, h, w in grid_thw]
    scores, keys = merged_scores_and_keys(query, key, sizes, visual.spatial_merge_unit, reverse)
    # Tensor parallel (mm_encoder_tp_mode "weights"): this rank's means cover its heads only.
    scores, keys = mean_over_head_shards(
        [scores, keys], heads_split=visual.blocks[scoring_block].attn.tp_size > 1)
    return merged, scores, keys


def qwen_vit_with_block_outputs(
    visual, pixel_values: torch.Tensor, grid_thw: list[list[int]], block_indices
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run vLLM's Qwen2.5-VL ViT; return the merger output [N, E] and, for each block in
    ``block_indices``, its output mean-pooled over each 2x2 merge group, in raster order
    [N, vision_hidden] (GlimpsePrune's VIP conditions; authors' ``_visual_forward``)."""
    wanted = set(block_indices)
    outputs = {}

    def keep(index, block, hidden):
        if index in wanted:
            outputs[index] = hidden

    hidden, meta = _run_vit_blocks(visual, pixel_values, grid_thw, after_block=keep)
    reverse = meta["reverse_indices"]
    unit = visual.spatial_merge_unit
    pooled = {
        i: out.reshape(out.shape[0] // unit, unit, -1).mean(dim=1)[reverse]
        for i, out in outputs.items()
    }
    return visual.merger(hidden)[reverse], pooled


def _run_vit_blocks(visual, pixel_values, grid_thw, before_block=None, after_block=None):
    """The ViT up to (not including) the merger, as ``Qwen2_5_VisionTransformer.forward`` runs
    it, with callbacks around each block; returns the last block's output (window order) and
    the encoder metadata. The blocks are compile-wrapped, so hooks on them do not fire
    (docs/design.md §3): this loop is how we see inside."""
    meta = visual.prepare_encoder_metadata(grid_thw)
    hidden = visual.input_norm(pixel_values.to(device=visual.device), visual.dtype)
    hidden = visual.patch_embed(hidden)
    seq_len, unit = hidden.shape[0], visual.spatial_merge_unit
    # Window order: merge groups permuted so that each attention window is contiguous.
    hidden = hidden.reshape(seq_len // unit, unit, -1)[meta["window_index"]]
    hidden = hidden.reshape(seq_len, 1, -1)
    cos, sin = meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"]
    for index, block in enumerate(visual.blocks):
        kind = "full" if index in visual.fullatt_block_indexes else "window"
        if before_block is not None:
            before_block(index, block, hidden, cos, sin)
        hidden = block(
            hidden,
            cu_seqlens=meta["cu_seqlens" if kind == "full" else "cu_window_seqlens"],
            rotary_pos_emb_cos=cos,
            rotary_pos_emb_sin=sin,
            max_seqlen=meta[f"max_seqlen_{kind}"],
            sequence_lengths=meta.get(f"sequence_lengths_{kind}"),
        )
        if after_block is not None:
            after_block(index, block, hidden.reshape(seq_len, -1))
    # vLLM's guard, kept with the copy: Qwen2.5-VL-3B overflows float16 in the last block on long
    # image sequences, and the ViT forward casts the overflow before the merger.
    if hidden.dtype == torch.float16:
        hidden = cast_overflow_tensors(hidden)
    return hidden, meta

