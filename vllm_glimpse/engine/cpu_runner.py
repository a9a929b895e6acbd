"""GlimpsePrune's model runner on vLLM's CPU engine. Only the CPU worker imports this module:
importing vLLM's CPU runner is harmless, but keep CPU-only code apart (``cpu`` in the name)."""

from __future__ import annotations

from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from vllm_glimpse.engine.runner import GlimpseRunnerMixin


class GlimpseCPUModelRunner(GlimpseRunnerMixin, CPUModelRunner):
    pass
