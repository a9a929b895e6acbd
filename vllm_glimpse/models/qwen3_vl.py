"""Our variants of vLLM's Qwen3-VL (dense and MoE): VisionZip on the ViT output, DeepStack
embeddings included.

ProcessingInfo and DummyInputsBuilder (vLLM's) → MultiModalProcessor (each image's placeholder
count from the VisionZip ratios, hashes salted with the settings, per-request budgets) → Model
(runs the ViT collecting what VisionZip reads, keeps D + C tokens per image at their original
M-RoPE positions). With method ``none`` every piece defers to vLLM's own.

What differs from Qwen2.5-VL:

- Scored block. VisionZip's Qwen2.5-VL code scores on the ViT's last full-attention block,
  ``max(fullatt_block_indexes)``, which is also the ViT's last block (the one whose output the
  merger turns into the image tokens). Qwen3-VL's ViT has no window attention, every block is a
  full-attention block, so the same rule picks its last block, ``depth - 1``.
- No window reordering: the ViT's patches are already grouped by 2x2 merge group in raster
  order of the merged tokens, so each run of 4 patches is one LLM token.
- DeepStack. The ViT's output row for a token is its main embedding followed by one embedding
  per DeepStack tap, concatenated on channels; vLLM adds the k-th to the output of LLM layer k
  at the image positions. VisionZip runs on the whole row, so every DeepStack embedding is
  selected and merged with exactly the rows (and the same member means) of the main embedding.
- Positions: interleaved M-RoPE, but the (t, h, w) of an image token and the text after an
  image are computed as on Qwen2.5-VL (t = 0 for images; text resumes one past the image's
  largest axis). ``get_mrope_input_positions`` lays the prompt out as if unpruned with vLLM's
  own code (videos included, each frame a run of tokens after its timestamp) and reads the
  pruned prompt's positions from it; image tokens get a provisional position that
  ``recompute_pruned_mrope_positions`` replaces once the image is encoded (its embeddings carry
  each token's image-local (t, h, w) as 3 extra channels).

Videos are not pruned. Token order: each image's kept tokens in raster order of their slots,
each contextual token in its target's slot (the authors' Qwen order, ``order="raster"``).
"""

from __future__ import annotations

import types

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_glimpse.models.common import BUDGET_FIELD, image_budgets
from vllm_glimpse.models.qwen_visionzip import (
    QwenFamilyPruningProcessorMixin,
    QwenFamilyVisionZipPositionsMixin,
    media_positions,
    merged_scores_and_keys,
    rotated_query_key,
    visionzip_per_image,
)
from vllm_glimpse.parallel import mean_over_head_shards
from vllm_glimpse.settings import PruningSettingsError, split_request_knobs

# --------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------


class VisionZipQwen3VLMultiModalProcessor(QwenFamilyPruningProcessorMixin,
                                          Qwen3VLMultiModalProcessor):
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        """Qwen3-VL's processor calls the HF processor itself (not ``_call_hf_processor``), so
        the request's pruning keys are taken out here: the HF processor never sees them, and
        the budget the images carry is the request's (validated like the engine's)."""
        ours, hf_only = split_request_knobs(hf_kwargs)
        processed = super()._apply_hf_processor_main(mm_items, hf_only)
        if ours and BUDGET_FIELD in processed:
            budget = self._image_budget(self._request_config(hf_kwargs))
            processed[BUDGET_FIELD] = torch.tensor(
                [budget] * self._num_images(processed), dtype=torch.float64)
        elif ours:
            self._request_config(hf_kwargs)  # a request without images: still checked
        return processed


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class QwenFamilyVisionZipModelMixin(QwenFamilyVisionZipPositionsMixin):
    """VisionZip for a vLLM Qwen-VL model whose images are (t=1, h, w) grids and whose image
    tokens get M-RoPE positions (t=0, row, column) after the image's vision-start token.
    Subclasses call ``_init_visionzip`` after vLLM's ``__init__`` and define
    ``_vit_with_visionzip_inputs(pixel_values, grid_thw)`` and
    ``_unpruned_mrope_input_positions(input_tokens, mm_features)``."""

    def embed_multimodal(self, **kwargs: object):
        if self.visionzip_ratios is None:
            return super().embed_multimodal(**kwargs)
        budgets = image_budgets(kwargs)  # per image: the request's ratios
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inputs is None:
                continue
            if modality.startswith("image"):  # "image" on Qwen3-VL, "images" on Qwen2-VL
                embeddings += self._visionzip_images(inputs, budgets)
            else:  # videos are not pruned; they carry their positions like the images do
                embeddings += self._videos_with_positions(inputs)
        return embeddings

    def _visionzip_images(self, image_input, budgets=None) -> tuple[torch.Tensor, ...]:
        if image_input["type"] != "pixel_values":  # the processor refuses these first
            raise PruningSettingsError("VisionZip needs pixel images, not image_embeds")
        grid_thw = image_input["image_grid_thw"].tolist()
        budgets = budgets or [self.visionzip_ratios] * len(grid_thw)
        merged, scores, keys = self._vit_with_visionzip_inputs(
            image_input["pixel_values"], grid_thw)
        # ``merged`` holds the whole ViT output row (main + DeepStack channels on Qwen3-VL),
        # so each kept row carries its DeepStack embeddings: they are pruned as one.
        return visionzip_per_image(
            merged, scores, keys, grid_thw, self.visual.spatial_merge_size, budgets)

    def _videos_with_positions(self, video_input) -> tuple[torch.Tensor, ...]:
        merge = self.visual.spatial_merge_size
        out = []
        for emb, (t, h, w) in zip(self._process_video_input(video_input),
                                  video_input["video_grid_thw"].tolist()):
            positions = self._video_local_positions(t, h // merge, w // merge)
            out.append(torch.cat([emb, positions.to(emb.device, emb.dtype)], dim=1))
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The pruned prompt's positions read off its unpruned layout: text and videos exactly
        (computed by vLLM's own code), each image token provisionally at its image's first
        position (re-placed by ``recompute_mrope_positions`` once the image is encoded)."""
        if self.visionzip_ratios is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        tokens = list(input_tokens)
        unpruned: list[int] = []
        index = np.empty(len(tokens), dtype=np.int64)  # each token's index in ``unpruned``
        moved, cursor = [], 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = feature.mm_position.offset, feature.mm_position.length
            index[cursor:offset] = np.arange(offset - cursor) + len(unpruned)
            unpruned += tokens[cursor:offset]
            start = len(unpruned)
            if feature.modality == "image":
                _, h, w = feature.data["image_grid_thw"].data.tolist()
                index[offset:offset + length] = start
                length_unpruned = h * w // merge**2
                unpruned += [self.config.image_token_id] * length_unpruned
            else:
                index[offset:offset + length] = np.arange(length) + start
                length_unpruned = length
                unpruned += tokens[offset:offset + length]
            moved.append(types.SimpleNamespace(
                modality=feature.modality, data=feature.data,
                mm_position=types.SimpleNamespace(offset=start, length=length_unpruned)))
            cursor = offset + length
        index[cursor:] = np.arange(len(tokens) - cursor) + len(unpruned)
        unpruned += tokens[cursor:]
        full, _ = self._unpruned_mrope_input_positions(unpruned, moved)
        positions = full[:, torch.from_numpy(index)]
        # Decoding continues one past the unpruned prompt's largest position.
        delta = int(full.max()) + 1 - len(tokens) if len(tokens) else 0
        return positions, delta


class Qwen3VLVisionZipMixin(QwenFamilyVisionZipModelMixin):
    """The Qwen3-VL specifics, shared by the dense and the MoE model (same ViT, processor and
    positions; only the LLM's MLPs differ)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_visionzip(vllm_config)

    def _vit_with_visionzip_inputs(self, pixel_values, grid_thw):
        return qwen3_vit_with_visionzip_inputs(self.visual, pixel_values, grid_thw)

    def _unpruned_mrope_input_positions(self, input_tokens, mm_features):
        return Qwen3VLForConditionalGeneration._get_mrope_input_positions(
            input_tokens=input_tokens, mm_features=mm_features, config=self.config)

    @staticmethod
    def _video_local_positions(t: int, h: int, w: int) -> torch.Tensor:
        # Qwen3-VL lays a video out frame by frame, each frame its own run of tokens after its
        # timestamp and vision-start token, at (0, row, column) from that run's start.
        return media_positions(1, h, w).repeat(t, 1)


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class VisionZipQwen3VLForConditionalGeneration(Qwen3VLVisionZipMixin,
                                             Qwen3VLForConditionalGeneration):
    """Qwen3-VL (dense LLM) with VisionZip."""


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipQwen3VLMultiModalProcessor,
    info=Qwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class VisionZipQwen3VLMoeForConditionalGeneration(Qwen3VLVisionZipMixin,
                                                Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE (mixture-of-experts LLM, the same ViT) with VisionZip."""


# --------------------------------------------------------------------------------------------
# The ViT with VisionZip's inputs
# --------------------------------------------------------------------------------------------


def qwen3_vit_with_visionzip_inputs(
    visual, pixel_values: torch.Tensor, grid_thw: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run vLLM's Qwen3-VL ViT as ``Qwen3_VisionTransformer.forward`` does and collect what
    VisionZip reads.

    Returns, per post-merger token of all images, in raster order: the ViT output row
    [N, out_hidden * (1 + DeepStack taps)] (main embedding, then each DeepStack embedding);
    the score, the attention the token receives in the last block (softmax probabilities
    averaged over heads, summed over all queries of its image, averaged over its 2x2 merge
    group) [N]; and that block's post-RoPE keys averaged over the merge group and over heads
    [N, head_dim].

    The blocks are compile-wrapped, so hooks on them do not fire: this loop runs them and
    recomputes the scoring block's query and key from its own ``qkv`` (one extra projection).
    """
    scoring_block = len(visual.blocks) - 1  # every block is full attention: the last one
    meta = visual.prepare_encoder_metadata(grid_thw)
    hidden = visual.input_norm(pixel_values.to(device=visual.device), visual.dtype)
    hidden = (visual.patch_embed(hidden) + meta["pos_embeds"]).unsqueeze(1)
    cos, sin = meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"]
    deepstack = []
    for index, block in enumerate(visual.blocks):
        if index == scoring_block:
            query, key = rotated_query_key(block, hidden, cos, sin)
        hidden = block(
            hidden,
            cu_seqlens=meta["cu_seqlens"],
            rotary_pos_emb_cos=cos,
            rotary_pos_emb_sin=sin,
            max_seqlen=meta["max_seqlen"],
            sequence_lengths=meta.get("sequence_lengths"),
        )
        if index in visual.deepstack_visual_indexes:
            tap = visual.deepstack_visual_indexes.index(index)
            deepstack.append(visual.deepstack_merger_list[tap](hidden))
    merged = torch.cat([visual.merger(hidden)] + deepstack, dim=1)
    sizes = [t * h * w for t, h, w in grid_thw]
    # The patches are in merge-group order already (no windows): the identity permutation.
    in_order = torch.arange(merged.shape[0], device=merged.device)
    scores, keys = merged_scores_and_keys(query, key, sizes, visual.spatial_merge_unit, in_order)
    # Tensor parallel (mm_encoder_tp_mode "weights"): this rank's means cover its heads only.
    return merged, *mean_over_head_shards(
        [scores, keys], heads_split=visual.blocks[scoring_block].attn.tp_size > 1)
