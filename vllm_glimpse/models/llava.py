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
    GlimpseTokenMixin,
    LlavaRequestBudgetMixin,
    PruningHashMixin,
    RequestBudgetModelMixin,
    clip_tower_with_visionzip_inputs,
)
from vllm_glimpse.models.glimpse_lm import GlimpseModelMixin
from vllm_glimpse.settings import PruningSettingsError, visionzip_budget
from vllm_glimpse.visionzip import visionzip


class PruningLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        budget = visionzip_budget(self.get_hf_config())
        if budget is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.visionzip_num_tokens(image_width, image_height, budget)

    def unpruned_num_tokens(self, width: int, height: int) -> int:
        return super().get_num_image_tokens(image_width=width, image_height=height)

    def visionzip_num_tokens(self, width: int, height: int, budget: tuple[int, int]) -> int:
        dominant, contextual = budget
        return dominant + contextual  # CLS + (D - 1) patches + C merged tokens, for any image


class PruningLlavaMultiModalProcessor(
    GlimpseTokenMixin, LlavaRequestBudgetMixin, PruningHashMixin, LlavaMultiModalProcessor
):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PruningLlavaMultiModalProcessor,
    info=PruningLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class PruningLlavaForConditionalGeneration(
    GlimpseModelMixin, RequestBudgetModelMixin, LlavaForConditionalGeneration
):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_glimpse(vllm_config)
        self.visionzip_budget = visionzip_budget(vllm_config.model_config.hf_config)
        self._pending_conditions: list[torch.Tensor] | None = None

    # ---- GlimpsePrune: CLIP hidden states ride along with the image embeddings ---------------

    def embed_multimodal(self, **kwargs: object):
        if not self.glimpse_enabled:
            return super().embed_multimodal(**kwargs)
        self._pending_conditions = []
        try:
            embeddings = super().embed_multimodal(**kwargs)
            conditions = self._pending_conditions
        finally:
            self._pending_conditions = None
        if len(embeddings) and not conditions:
            raise PruningSettingsError(
                "GlimpsePrune on LLaVA needs pixel images (it reads the CLIP tower's hidden "
                "states); precomputed image embeddings cannot be pruned")
        return self._with_conditions(embeddings, torch.cat(conditions))

    def _glimpse_features(self, vision_tower, pixel_values):
        """The tower's output as vLLM selects it, and GlimpsePrune's conditions: HF
        ``hidden_states[i][:, 1:]`` (CLS dropped) for i in ``selected_visual_layers``
        (index 0 = the embeddings after ``pre_layrnorm``, i = output of encoder layer i - 1)."""
        from vllm.model_executor.models.vision import resolve_visual_encoder_outputs

        vision_model = vision_tower.vision_model
        layers = self.glimpse_checkpoint.config.selected_visual_layers
        hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values.to(vision_tower.dtype)))
        states = [hidden]
        for layer in vision_model.encoder.layers:
            hidden = layer(hidden)
            states.append(hidden)
        features = resolve_visual_encoder_outputs(
            hidden, vision_model.post_layernorm, select_layers=None,
            max_possible_layers=vision_model.config.num_hidden_layers,
            feature_select_strategy=self.config.vision_feature_select_strategy)
        conditions = torch.cat([states[i][:, 1:] for i in layers], dim=-1)
        return features, conditions

    def glimpse_image_grid(self, mm_feature) -> tuple[int, int]:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def _glimpse_text_model(self):
        return self.language_model.model

    def _glimpse_vision_layers_available(self) -> int:
        return len(self.vision_tower.vision_model.encoder.layers) + 1


    def _image_pixels_to_features(self, vision_tower, pixel_values):
        if self._pending_conditions is not None:
            features, conditions = self._glimpse_features(vision_tower, pixel_values)
            self._pending_conditions.append(conditions)
            return features
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
