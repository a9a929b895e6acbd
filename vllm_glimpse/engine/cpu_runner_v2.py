"""GlimpsePrune's model runner on vLLM's CPU engine under Model Runner V2 (CPU-only module)."""

from __future__ import annotations

from vllm.v1.worker.cpu.model_runner import CPUModelRunner

from vllm_glimpse.engine.runner_v2 import GlimpseRunnerV2Mixin


class GlimpseCPUModelRunnerV2(GlimpseRunnerV2Mixin, CPUModelRunner):
    pass
