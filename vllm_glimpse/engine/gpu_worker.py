"""GlimpsePrune's worker on a GPU (vLLM ``Worker``): it builds our model runner, on the runner
vLLM chose (``VllmConfig.use_v2_model_runner``): Model Runner V2 wherever vLLM picks it, the V1
runner only where vLLM itself falls back to it."""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker


class GlimpseGPUWorker(Worker):
    def _make_model_runner(self):
        if getattr(self, "use_v2_model_runner", True):  # vLLM 0.34: MRv2 only, no attribute
            from vllm_glimpse.engine.gpu_runner_v2 import GlimpseGPUModelRunnerV2

            return GlimpseGPUModelRunnerV2(self.vllm_config, self.device)
        from vllm_glimpse.engine.gpu_runner import GlimpseGPUModelRunner

        return GlimpseGPUModelRunner(self.vllm_config, self.device)
