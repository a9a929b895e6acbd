"""C++ CPU ops from ``csrc/``, compiled on first use with ninja through torch's extension loader.

The build lands in ``$VLLM_GLIMPSE_CACHE/build`` (default ``~/.cache/vllm-glimpse/build``) and
is reused while the sources are unchanged. Where no C++ toolchain is available, :func:`cpu_ops`
returns None once with a warning and callers use their torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = ("visionzip_merge.cpp",)


def _csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # wheel install, source checkout
        if all((candidate / s).is_file() for s in SOURCES):
            return candidate
    raise FileNotFoundError(f"vllm-glimpse C++ sources {SOURCES} not found next to {here}")


def _build_dir() -> Path:
    root = os.environ.get("VLLM_GLIMPSE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm-glimpse")
    # One build per Python environment and torch: two checkouts (two venvs) sharing the cache
    # would otherwise keep rebuilding each other's (torch's build.ninja names the venv's paths).
    env_key = hashlib.sha256(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:12]
    path = Path(root, "build", f"cpu_ops-{env_key}")
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def cpu_ops(required: bool = False):
    """The compiled extension module, or None (torch fallback) unless ``required``."""
    try:
        from torch.utils.cpp_extension import load

        csrc = _csrc_dir()
        return load(
            name="vllm_glimpse_cpu_ops",
            sources=[str(csrc / s) for s in SOURCES],
            build_directory=str(_build_dir()),
            extra_cflags=["-O3"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, read-only cache...
        if required:
            raise
        logger.warning("vllm-glimpse C++ CPU ops unavailable (%s); using the torch path", exc)
        return None
