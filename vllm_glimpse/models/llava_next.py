"""Our variant of vLLM's LLaVA-NeXT: VisionZip per crop (the base image and every anyres crop).

Token layout per image, as the authors' ``prepare_inputs_labels_for_multimodal_visionzip`` with
``restore_image_features_sorted`` builds it (github.com/dvlab-research/VisionZip,
``visionzip/llava_arch.py``; newline tokens and unpadding are dropped there):

    [base: CLS, dominant patches, contextual]
    [crops: every crop's dominant patches in raster order of the whole crop grid]
    [crops: CLS of each crop] [crops: contextual tokens of each crop]

so an image with n crops takes (D + C) * (1 + n) placeholder tokens.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    get_anyres_image_grid_shape,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_glimpse.models.common import (
    LlavaRequestBudgetMixin,
    PruningHashMixin,
    RequestBudgetModelMixin,
    clip_tower_with_visionzip_inputs,
)
from vllm_glimpse.settings import visionzip_budget
from vllm_glimpse.visionzip import visionzip


class VisionZipLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        hf_config = self.get_hf_config()
        budget = visionzip_budget(hf_config)
        if budget is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.visionzip_num_tokens(image_width, image_height, budget)

    def unpruned_num_tokens(self, width: int, height: int) -> int:
        return super().get_num_image_tokens(image_width=width, image_height=height)

    def visionzip_num_tokens(self, width: int, height: int, budget: tuple[int, int]) -> int:
        rows, cols = get_anyres_image_grid_shape(
            image_size=(height, width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=self.get_vision_encoder_info().get_image_size(),
        )
        return sum(budget) * (1 + rows * cols)


class VisionZipLlavaNextMultiModalProcessor(
    LlavaRequestBudgetMixin, PruningHashMixin, LlavaNextMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipLlavaNextMultiModalProcessor,
    info=VisionZipLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VisionZipLlavaNextForConditionalGeneration(
    RequestBudgetModelMixin, LlavaNextForConditionalGeneration
):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionzip_budget = visionzip_budget(vllm_config.model_config.hf_config)

    def _process_image_input(self, image_input):
        if self.visionzip_budget is None or image_input.get("type") != "pixel_values":
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        image_sizes = image_input["image_sizes"]
        per_image = list(pixel_values) if isinstance(pixel_values, torch.Tensor) else pixel_values
        budgets = self._request_budgets or [self.visionzip_budget] * len(per_image)
        return [
            self._visionzip_one_image(crops, size, (int(d), int(c)))
            for crops, size, (d, c) in zip(per_image, image_sizes, budgets)
        ]

    def _visionzip_one_image(self, crops: torch.Tensor, image_size: torch.Tensor,
                             budget: tuple[int, int]) -> torch.Tensor:
        dominant, contextual = budget
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size  # patches per crop side (24 for 336/14)
        rows, cols = get_anyres_image_grid_shape(
            tuple(image_size.tolist()), self.config.image_grid_pinpoints, vision.image_size
        )
        crops = crops[: 1 + rows * cols]  # pixel values may be padded for batching
        hidden, cls_scores, keys = clip_tower_with_visionzip_inputs(self.vision_tower, crops)
        cls_index = torch.zeros(1, dtype=torch.long, device=hidden.device)
        results = [
            visionzip(hidden[i], cls_scores[i], keys[i], dominant, contextual, cls_index)
            for i in range(hidden.shape[0])
        ]
        embeds = self.multi_modal_projector(torch.stack([r.tokens for r in results]))
        base, crop_embeds, crop_results = embeds[0], embeds[1:], results[1:]
        if not crop_results:
            return base
        # Dominant patches of all crops, ordered by their place in the (rows*side, cols*side) grid.
        patch = torch.stack([r.dominant_index[1:] - 1 for r in crop_results])  # [n, D-1]
        crop_id = torch.arange(len(crop_results), device=patch.device)[:, None]
        grid_row = (crop_id // cols) * side + patch // side
        grid_col = (crop_id % cols) * side + patch % side
        order = torch.argsort((grid_row * cols * side + grid_col).flatten())
        dominant_patches = crop_embeds[:, 1:dominant].reshape(-1, crop_embeds.shape[-1])[order]
        return torch.cat([
            base,
            dominant_patches,
            crop_embeds[:, 0],
            crop_embeds[:, dominant:].reshape(-1, crop_embeds.shape[-1]),
        ])
