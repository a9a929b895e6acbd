"""Our variant of vLLM's Qwen2.5-VL. With method ``none`` it is vLLM's model unchanged; the
pruning methods for it are not implemented yet (settings.VARIANTS lists what each model runs)."""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration


class GlimpseQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    pass
