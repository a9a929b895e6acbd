"""GlimpsePrune's model runner on a GPU under vLLM's Model Runner V2."""

from __future__ import annotations

from vllm.v1.worker.gpu.model_runner import GPUModelRunner

from vllm_glimpse.engine.runner_v2 import GlimpseRunnerV2Mixin


class GlimpseGPUModelRunnerV2(GlimpseRunnerV2Mixin, GPUModelRunner):
    pass
