"""GlimpsePrune's worker on vLLM's CPU engine.

CPU-only: importing ``vllm.v1.worker.cpu_worker`` runs vLLM's ``v1/worker/cpu/shm.py``, which
replaces ``torch.cuda.Event``, ``torch.cuda.Stream``, the accelerator memory queries and
``Tensor.pin_memory`` with CPU stand-ins for the whole process. Nothing a GPU process loads may
import this module; the engine settings name it only when the platform is the CPU.

``CPUWorker.init_device`` builds its runner by a class name it imports (vLLM 0.32/0.33: the V1
``CPUModelRunner`` its module imports, or Model Runner V2's ``CPUModelRunner`` it imports from
``v1/worker/cpu/model_runner.py`` when ``use_v2_model_runner``; 0.34: Model Runner V2's, imported
by its module), so for the duration of that call the name points at our runner of the same kind.
"""

from __future__ import annotations

import contextlib
import importlib

from vllm.v1.worker.cpu_worker import CPUWorker


@contextlib.contextmanager
def _runner_class_named(module_names: tuple[str, ...], name: str, replacement: type):
    """Point ``name`` in each of ``module_names`` at ``replacement`` where it names a class
    ``replacement`` extends (the runner of the kind vLLM chose), for the duration of the block."""
    swapped = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        original = getattr(module, name, None)
        if isinstance(original, type) and issubclass(replacement, original):
            swapped.append((module, original))
            setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, original in swapped:
            setattr(module, name, original)


#: Where ``CPUWorker.init_device`` finds its runner class by the name ``CPUModelRunner``: the worker
#: module (V1's runner in vLLM 0.32/0.33, Model Runner V2's in 0.34) and Model Runner V2's module
#: (imported inside ``init_device`` in 0.32/0.33).
RUNNER_MODULES = ("vllm.v1.worker.cpu_worker", "vllm.v1.worker.cpu.model_runner")


class GlimpseCPUWorker(CPUWorker):
    def init_device(self):
        # vLLM 0.34 has only Model Runner V2 (and no use_v2_model_runner attribute).
        if getattr(self, "use_v2_model_runner", True):
            from vllm_glimpse.engine.cpu_runner_v2 import GlimpseCPUModelRunnerV2 as runner
        else:
            from vllm_glimpse.engine.cpu_runner import GlimpseCPUModelRunner as runner
        with _runner_class_named(RUNNER_MODULES, "CPUModelRunner", runner):
            return super().init_device()
