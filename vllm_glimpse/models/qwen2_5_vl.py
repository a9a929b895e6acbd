"""Our variant of vLLM's Qwen2.5-VL. With method ``none`` it is vLLM's model unchanged."""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from vllm_glimpse.settings import pruning_config_of


class GlimpseQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruning = pruning_config_of(vllm_config.model_config.hf_config)
