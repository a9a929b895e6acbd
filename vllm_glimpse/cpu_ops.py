"""C++ CPU ops from ``csrc/``, compiled on first use with ninja through torch's extension loader.

The build lands in ``$VLLM_GLIMPSE_CACHE/build`` (default ``~/.cache/vllm-glimpse/build``) and
is reused while the sources are unchanged. Where no C++ toolchain is available, :func:`cpu_ops`
returns None once with a warning and callers use their torch path.

Concurrent builds (several engine processes start at once) are serialised by an ``flock`` on
the build directory, which the kernel releases when its holder dies. torch's loader has its own
lock *file*, which a process killed mid-build leaves behind and every later loader then waits on
forever; under our ``flock`` no other builder can be running, so such a file is stale and goes.
"""

from __future__ import annotations

import contextlib
import fcntl
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


def _build_dir(csrc: Path) -> Path:
    root = os.environ.get("VLLM_GLIMPSE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm-glimpse")
    # One build per Python environment, torch and source directory: torch's build.ninja names
    # the venv's and the sources' paths, so two environments or two installs (a checkout and a
    # wheel) sharing one directory would keep rebuilding each other's.
    env_key = hashlib.sha256(f"{sys.prefix}|{torch.__version__}|{csrc}".encode()).hexdigest()[:12]
    path = Path(root, "build", f"cpu_ops-{env_key}")
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def cpu_ops(required: bool = False):
    """The compiled extension module, or None (torch fallback) unless ``required``."""
    try:
        from torch.utils.cpp_extension import load

        csrc = _csrc_dir()
        build_dir = _build_dir(csrc)
        with _exclusive(build_dir):
            (build_dir / "lock").unlink(missing_ok=True)  # stale: see the module docstring
            return load(
                name="vllm_glimpse_cpu_ops",
                sources=[str(csrc / s) for s in SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O3"],
                verbose=False,
            )
    except Exception as exc:  # no compiler, no ninja, read-only cache...
        if required:
            raise
        logger.warning("vllm-glimpse C++ CPU ops unavailable (%s); using the torch path", exc)
        return None


@contextlib.contextmanager
def _exclusive(build_dir: Path):
    with open(build_dir / "flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
