"""vLLM's workers, building our model runner (vLLM 0.32).

The GPU worker builds its runner in ``_make_model_runner``; ``CPUWorker.init_device`` builds
it by the class name its module imported, so for the duration of that call the name points at
our runner (:mod:`.runner`). The V2 model runner is refused by ``engine_config``.
"""

from __future__ import annotations

import contextlib

from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker


@contextlib.contextmanager
def _runner_class(module_name: str, name: str, replacement: type):
    import importlib

    module = importlib.import_module(module_name)
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


class GlimpseCPUWorker(CPUWorker):
    def init_device(self):
        from vllm_glimpse.engine.runner import GlimpseCPUModelRunner

        with _runner_class("vllm.v1.worker.cpu_worker", "CPUModelRunner", GlimpseCPUModelRunner):
            return super().init_device()


class GlimpseGPUWorker(Worker):
    def _make_model_runner(self):
        from vllm_glimpse.engine.runner import GlimpseGPUModelRunner

        return GlimpseGPUModelRunner(self.vllm_config, self.device)
