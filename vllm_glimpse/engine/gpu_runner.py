"""GlimpsePrune's model runner on a GPU: vLLM 0.32's V1 ``GPUModelRunner`` with our mixin."""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_glimpse.engine.runner import GlimpseRunnerMixin


class GlimpseGPUModelRunner(GlimpseRunnerMixin, GPUModelRunner):
    pass
