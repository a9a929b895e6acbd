"""GlimpsePrune's worker on vLLM's CPU engine (vLLM 0.32).

CPU-only: importing ``vllm.v1.worker.cpu_worker`` runs vLLM's ``v1/worker/cpu/shm.py``, which
replaces ``torch.cuda.Event``, ``torch.cuda.Stream``, the accelerator memory queries and
``Tensor.pin_memory`` with CPU stand-ins for the whole process. Nothing a GPU process loads may
import this module; the engine settings name it only when the platform is the CPU.

``CPUWorker.init_device`` builds its runner by the class name its module imported
(``CPUModelRunner``), so for the duration of that call the name points at our runner.
"""

from __future__ import annotations

import contextlib

import vllm.v1.worker.cpu_worker as vllm_cpu_worker
from vllm.v1.worker.cpu_worker import CPUWorker


@contextlib.contextmanager
def _runner_class_named(module, name: str, replacement: type):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


class GlimpseCPUWorker(CPUWorker):
    def init_device(self):
        from vllm_glimpse.engine.cpu_runner import GlimpseCPUModelRunner

        with _runner_class_named(vllm_cpu_worker, "CPUModelRunner", GlimpseCPUModelRunner):
            return super().init_device()
