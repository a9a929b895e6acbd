"""Our variant of vLLM's LLaVA-1.5: VisionZip after the CLIP tower.

ProcessingInfo (how many placeholder tokens an image gets) → MultiModalProcessor (hashes salted
with the pruning settings) → Model (runs the tower, keeps D + C tokens per image). With method
``none`` every piece defers to vLLM's own.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
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


class GlimpseLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        budget = visionzip_budget(self.get_hf_config())
        if budget is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.visionzip_num_tokens(image_width, image_height, budget)

    def visionzip_num_tokens(self, width: int, height: int, budget: tuple[int, int]) -> int:
        dominant, contextual = budget
        return dominant + contextual  # CLS + (D - 1) patches + C merged tokens, for any image


class GlimpseLlavaMultiModalProcessor(
    LlavaRequestBudgetMixin, PruningHashMixin, LlavaMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    GlimpseLlavaMultiModalProcessor,
    info=GlimpseLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class GlimpseLlavaForConditionalGeneration(
    RequestBudgetModelMixin, LlavaForConditionalGeneration
):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionzip_budget = visionzip_budget(vllm_config.model_config.hf_config)

    def _image_pixels_to_features(self, vision_tower, pixel_values):
        if self.visionzip_budget is None:
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        hidden, cls_scores, keys = clip_tower_with_visionzip_inputs(vision_tower, pixel_values)
        budgets = self._request_budgets or [self.visionzip_budget] * hidden.shape[0]
        cls_index = torch.zeros(1, dtype=torch.long, device=hidden.device)
        # Output per image: [CLS, dominant patches in raster order, contextual], as the authors'
        # CLIPVisionTower_VisionZip.forward returns it to the projector. Images of one batch may
        # run different budgets (per-request settings): then a tuple of [D_i + C_i, E].
        features = tuple(
            visionzip(hidden[i], cls_scores[i], keys[i], int(d), int(c), cls_index).tokens
            for i, (d, c) in enumerate(budgets)
        )
        if len({f.shape[0] for f in features}) == 1:
            return torch.stack(features)
        return features
