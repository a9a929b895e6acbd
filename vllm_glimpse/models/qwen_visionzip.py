"""VisionZip pieces shared by our Qwen-VL models (Qwen2.5-VL, Qwen3-VL and its MoE, Qwen2-VL).

Each model runs its own ViT (``qwen2_5_vl.py``, ``qwen3_vl.py``, ``qwen2_vl.py``) and hands over,
per post-merger token of all images in raster order: the ViT output row, the attention the token
receives in the scored block and that block's key. From there the family is one: each image keeps
D + C tokens in the authors' Qwen order, every token at its slot's image-local (t, h, w) M-RoPE
position, carried in ``POSITION_CHANNELS`` extra embedding channels until the runner re-places the
tokens (``recompute_pruned_mrope_positions``, hooked into each model by
``QwenFamilyVisionZipPositionsMixin``). The processors share one mixin
(``QwenFamilyPruningProcessorMixin``: placeholder counts, per-request budgets, hashes, the
aspect-ratio check); video positions and how each model lays out an unpruned prompt stay in the
model files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from vllm_glimpse.kernels.visionzip_triton import attention_received_scores
from vllm_glimpse.models.common import PruningHashMixin, RequestBudgetMixin, item_budget
from vllm_glimpse.settings import variant_for, visionzip_counts, visionzip_ratios
from vllm_glimpse.visionzip import visionzip

# transformers' Qwen2-VL ``smart_resize`` raises for an absolute aspect ratio >= 200 (MAX_RATIO).
QWEN_MAX_ASPECT_RATIO = 200

#: Channels appended to each image/video embedding row: the token's image-local (t, h, w).
POSITION_CHANNELS = 3


# --------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------


class QwenFamilyPruningProcessorMixin(RequestBudgetMixin, PruningHashMixin):
    """The processor side of our Qwen-VL models (images carry ``image_grid_thw``), for every
    method: hashes salted with the settings, per-request budgets, the aspect-ratio check and,
    under VisionZip, each image's D + C placeholders, fixed here when the prompt is processed,
    for any image size."""

    def _image_budget(self, config) -> tuple[float, float] | None:
        return visionzip_ratios(self.info.get_hf_config(), config)

    def _num_images(self, processed) -> int:
        grid = processed.get("image_grid_thw")
        return 0 if grid is None else len(grid)

    def _unpruned_tokens(self, processed) -> list[int]:
        merge_unit = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        return [int(g.prod()) // merge_unit for g in processed["image_grid_thw"]]

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        self._check_aspect_ratios(mm_items)
        return super()._apply_hf_processor_main(mm_items, hf_kwargs)

    def _check_aspect_ratios(self, mm_items) -> None:
        """Say which image the HF processor would refuse, and why: vLLM reports its failure as
        "Failed to apply ...Processor on data=..." without the cause. Only pixel images are
        resized; precomputed image_embeds pass (VisionZip refuses them with its own reason in
        the prompt updates)."""
        images = mm_items.get("image")
        if not isinstance(images, ImageProcessorItems):
            return
        for i in range(len(images)):
            size = images.get_image_size(i)
            short, long = min(size.width, size.height), max(size.width, size.height)
            if short < 1 or long / short >= QWEN_MAX_ASPECT_RATIO:
                name = variant_for(self.info.get_hf_config()).display_name
                raise ValueError(
                    f"image {i + 1} is {size.width}x{size.height} px: {name} takes images whose "
                    f"longer side is less than {QWEN_MAX_ASPECT_RATIO} times the shorter one")

    def _get_prompt_updates(
        self,
        mm_items,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        ratios = visionzip_ratios(hf_config)
        if ratios is None:
            return updates
        merge_unit = hf_config.vision_config.spatial_merge_size ** 2
        name = variant_for(hf_config).display_name

        def image_replacement(item_idx: int, image_token: list[int]):
            item = out_mm_kwargs["image"][item_idx]
            if "image_grid_thw" not in item or "pixel_values" not in item:
                raise ValueError(
                    f"VisionZip on {name} needs pixel images: it scores each token by the "
                    "ViT's attention, so precomputed image_embeds cannot be pruned"
                )
            num_tokens = int(item["image_grid_thw"].data.prod()) // merge_unit
            item_ratios = item_budget(out_mm_kwargs, item_idx) or ratios
            return image_token * sum(visionzip_counts(num_tokens, *item_ratios))

        return [
            PromptReplacement(
                modality="image",
                target=update.target,
                replacement=lambda i, token=list(update.target): image_replacement(i, token),
            )
            if update.modality == "image"
            else update
            for update in updates
        ]


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def visionzip_per_image(
    merged: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    grid_thw: list[list[int]],
    merge: int,
    budgets: Sequence[tuple[float, float]],
) -> tuple[torch.Tensor, ...]:
    """VisionZip on each image of one ViT run.

    ``merged`` [N, E], ``scores`` [N] and ``keys`` [N, head_dim] hold every post-merger token of
    all images in raster order; ``grid_thw`` is each image's patch grid, ``merge`` the ViT's
    spatial merge size and ``budgets`` each image's (dominant_ratio, contextual_ratio). Returns,
    per image, its D + C kept rows [D + C, E + POSITION_CHANNELS]: each row followed by its slot's
    image-local (t, h, w).
    """
    sizes = [t * h * w // merge**2 for t, h, w in grid_thw]
    out = []
    for tokens, score, key, (t, h, w), ratios in zip(
        merged.split(sizes), scores.split(sizes), keys.split(sizes), grid_thw, budgets
    ):
        dominant, contextual = visionzip_counts(tokens.shape[0], *ratios)
        # The authors' Qwen order: kept slots in raster order, each contextual token in its
        # target's slot; every token at its slot's (t, h, w) position.
        result = visionzip(tokens, score, key, dominant, contextual, order="raster")
        positions = media_positions(t, h // merge, w // merge).to(tokens.device)
        out.append(torch.cat([result.tokens, positions[result.slots].to(tokens.dtype)], dim=1))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


def media_extent(t: int, h: int, w: int, t_factor: float = 1.0) -> int:
    """How far a media item of LLM grid (t, h, w) advances the position of the text after it:
    one past its largest position on any axis (vLLM's and HF's ``get_rope_index`` rule)."""
    return max(int((t - 1) * t_factor), h - 1, w - 1) + 1


def media_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """[t*h*w, 3] image-local (t, h, w) positions of a media item's tokens in raster order, as
    ``get_mrope_input_positions`` assigns them."""
    grid = np.indices((t, h, w)).reshape(3, -1)
    grid[0] = (grid[0] * t_factor).astype(np.int64)
    return torch.from_numpy(grid.T.copy())


def recompute_pruned_mrope_positions(media_token_ids, input_ids, multimodal_embeddings,
                                     mrope_positions, num_computed_tokens):
    """Strip the position channels off this step's media embeddings and write those tokens'
    final positions: the base of the token's run of media tokens (one past the token before
    the run: the vision-start token) + the token's local (t, h, w) carried in the channels.

    Only the media tokens gathered in this step change (the text positions are exact already):
    the k-th embedding row of the step is the (m + k)-th media token of the prompt, m being the
    media tokens computed before the step. (vLLM's generic ``recompute_mrope_positions``
    re-derives everything from the step boundary and mistakes a step that starts after a
    finished image for the continuation of that image; vLLM 0.32,
    ``multimodal/video_prune/evs.py``.)
    """
    positions = mrope_positions.clone()
    embeddings = [mm[:, :-POSITION_CHANNELS] for mm in multimodal_embeddings]
    if not multimodal_embeddings:
        return embeddings, positions, int(positions.max()) + 1 - positions.shape[1]
    ids = torch.as_tensor(input_ids, device=positions.device)
    is_media = torch.zeros_like(ids, dtype=torch.bool)
    for token_id in media_token_ids:
        is_media |= ids == token_id
    run_begins = is_media & ~torch.cat([is_media.new_zeros(1), is_media[:-1]])
    run_of_token = torch.cumsum(run_begins.long(), 0) - 1
    run_base = positions[0, torch.nonzero(run_begins).squeeze(-1) - 1] + 1
    media_tokens = torch.nonzero(is_media).squeeze(-1)
    first = int(is_media[:num_computed_tokens].sum())
    local = torch.cat([mm[:, -POSITION_CHANNELS:] for mm in multimodal_embeddings])
    local = local.long().T.to(positions.device)
    tokens = media_tokens[first:first + local.shape[1]]
    positions[:, tokens] = run_base[run_of_token[tokens]] + local
    return embeddings, positions, int(positions.max()) + 1 - positions.shape[1]


class QwenFamilyVisionZipPositionsMixin:
    """For a vLLM Qwen-VL model: under VisionZip, switch the runner's position recompute on and
    re-place each pruned media token once its embedding (which carries the token's image-local
    (t, h, w)) is gathered; without VisionZip the recompute is vLLM's own. Call
    ``_init_visionzip`` after vLLM's ``__init__``."""

    visionzip_ratios: tuple[float, float] | None = None

    def _init_visionzip(self, vllm_config) -> None:
        self.visionzip_ratios = visionzip_ratios(vllm_config.model_config.hf_config)
        # Read by the runner patch: pruned images need their positions re-placed.
        self.needs_mrope_recompute = self.visionzip_ratios is not None
        if self.visionzip_ratios is None:
            return
        # vLLM's own flag for models whose embeddings carry positions: it also keeps the
        # encoder out of CUDA graphs, which would bypass embed_multimodal.
        self.is_multimodal_pruning_enabled = True

    def get_model_state_cls(self) -> type:
        """Model Runner V2 asks the model for its state class: under VisionZip, one that runs the
        position recompute (``vllm_glimpse.engine.model_states``)."""
        from vllm_glimpse.engine.model_states import model_state_cls

        return model_state_cls(self)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions,
                                  num_computed_tokens):
        """Strip the position channels off this step's media embeddings and write those tokens'
        final positions (``recompute_pruned_mrope_positions``: vLLM's generic version mistakes
        a step that starts after a finished image for the continuation of that image)."""
        if self.visionzip_ratios is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)
        return recompute_pruned_mrope_positions(
            (self.config.image_token_id, self.config.video_token_id),
            input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)


# --------------------------------------------------------------------------------------------
# Scores and keys from the scored ViT block
# --------------------------------------------------------------------------------------------


def merged_scores_and_keys(
    query: torch.Tensor,
    key: torch.Tensor,
    image_sizes: list[int],
    merge_unit: int,
    reverse_indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the scoring block's post-RoPE query/key [S, heads, head_dim] of all images in the
    ViT's window order to VisionZip's score [N] and keys [N, head_dim] per post-merger token in
    raster order (N = S / merge_unit)."""
    # Full attention runs per image, and in window order each image's patches are contiguous.
    # The score never builds an S x S matrix: a two-pass Triton kernel on GPU, query chunks on CPU.
    scores = torch.cat([
        attention_received_scores(q, k, reduce="mean")
        for q, k in zip(query.split(image_sizes), key.split(image_sizes))
    ])
    # Each run of merge_unit patches in window order is one 2x2 merge group (one LLM token).
    scores = scores.view(-1, merge_unit).mean(dim=-1)[reverse_indices]
    groups = key.float().view(key.shape[0] // merge_unit, merge_unit, *key.shape[1:])
    keys = groups.mean(dim=1)[reverse_indices].mean(dim=1)
    return scores, keys


def rotated_query_key(block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The block's post-RoPE query and key [S, heads, head_dim], as its attention computes them.

    For ``Qwen2_5_VisionAttention`` (Qwen2.5-VL's blocks and Qwen3-VL's): its ``qkv`` is a
    ``QKVParallelLinear``, so each rank's output is [q | k | v] of its own heads and a view
    splits it. Qwen2-VL's ``qkv`` is a plain column-parallel linear whose rank shard is a slice
    of the whole [q | k | v]; ``qwen2_vl.py`` keeps its own version, through ``split_qkv``.
    """
    attn = block.attn
    qkv, _ = attn.qkv(block.norm1(hidden))  # [S, 1, 3 * heads * head_dim]
    heads, head_dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    qk = qkv.view(qkv.shape[0], 3, heads, head_dim)[:, :2].transpose(0, 1).contiguous()
    query, key = attn.apply_rotary_emb(qk, cos, sin).unbind(0)
    return query, key
