"""GlimpsePrune's worker on a GPU (vLLM 0.32 ``Worker``): it builds our V1 model runner.

The engine settings make vLLM's own ``VllmConfig.use_v2_model_runner`` resolve False for pruning
engines, so the worker, the scheduler and the warm-up all agree on the V1 runner built here.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker


class GlimpseGPUWorker(Worker):
    def _make_model_runner(self):
        from vllm_glimpse.engine.gpu_runner import GlimpseGPUModelRunner

        return GlimpseGPUModelRunner(self.vllm_config, self.device)
