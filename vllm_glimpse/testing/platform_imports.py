"""Check that a GPU process can load the plugin: import every module of the installed package
except the CPU-only ones (``cpu`` in the file name), after ``register()`` and vLLM's model-config
import, and report whether vLLM's CPU worker got loaded or ``torch.cuda`` was altered.

Importing ``vllm.v1.worker.cpu_worker`` runs vLLM's ``v1/worker/cpu/shm.py``, which replaces
``torch.cuda.Event``, ``torch.cuda.Stream``, ``torch.accelerator.get_memory_info``,
``Tensor.pin_memory`` and more with CPU stand-ins for the whole process: a GPU worker that did so
would profile memory against host RAM. Run as ``python -m vllm_glimpse.testing.platform_imports``
in a fresh process; it prints one JSON line and exits 1 if anything is wrong.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys

CPU_WORKER_MODULE = "vllm.v1.worker.cpu_worker"


def is_cpu_only(module_name: str) -> bool:
    return "cpu" in module_name.rsplit(".", 1)[-1]


def main() -> int:
    import torch

    watched = {
        "torch.cuda.Event": (torch.cuda, "Event"),
        "torch.cuda.Stream": (torch.cuda, "Stream"),
        "torch.Event": (torch, "Event"),
        "torch.Tensor.pin_memory": (torch.Tensor, "pin_memory"),
        "torch.accelerator.get_memory_info": (torch.accelerator, "get_memory_info"),
    }
    before = {name: getattr(obj, attr, None) for name, (obj, attr) in watched.items()}

    from vllm_glimpse.plugin import register

    register()
    importlib.import_module("vllm.model_executor.models.config")
    import vllm_glimpse

    imported, skipped = [], []
    # kernels/ installs as vllm_glimpse.kernels; an editable install maps it from outside the
    # package directory, where walking vllm_glimpse alone does not find it.
    kernels = importlib.import_module("vllm_glimpse.kernels")
    modules = [info.name for info in pkgutil.walk_packages(vllm_glimpse.__path__, "vllm_glimpse.")]
    modules += [info.name for info in pkgutil.walk_packages(kernels.__path__, "vllm_glimpse.kernels.")]
    for name in sorted(set(modules) | {"vllm_glimpse.kernels"}):
        if is_cpu_only(name):
            skipped.append(name)
            continue
        importlib.import_module(name)
        imported.append(name)

    changed = [name for name, (obj, attr) in watched.items()
               if getattr(obj, attr, None) is not before[name]]
    report = {
        "imported": imported,
        "skipped_cpu_only": skipped,
        "cpu_worker_loaded": CPU_WORKER_MODULE in sys.modules,
        "torch_changed": changed,
    }
    print(json.dumps(report))
    return 1 if report["cpu_worker_loaded"] or changed else 0


if __name__ == "__main__":
    sys.exit(main())
