"""Make the PyPI torchvision wheel importable next to a CPU-only torch.

torchvision 0.28.0 on PyPI is CUDA-linked. On torch 2.13.0+cpu its C extension fails to load,
so the ops it would define (``torchvision::nms``, ``torchvision::qnms``) do not exist, yet
``torchvision/_meta_registrations.py`` registers fake kernels for these two without the
``_has_ops()`` guard the other ops have, and ``import torchvision`` raises
"operator torchvision::nms does not exist". vLLM's Qwen2-VL code and transformers' image
processors import torchvision, so every process of the CPU environment needs the schemas declared
before that import.

``scripts/setup_env.sh`` installs a ``.pth`` file calling :func:`install` only when it finds the
extension unloadable, so GPU installs with a working torchvision never run this. The hook is
lazy: it declares the schemas when ``torchvision`` is first imported, so Python start-up does not
import torch.
"""

from __future__ import annotations

import importlib.abc
import sys

# Schemas as torchvision's csrc/ops/nms.cpp declares them (torchvision 0.28).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive: dropping it removes the schemas


def declare_missing_ops() -> None:
    global _library
    if _library is not None:
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        name = schema.split("(", 1)[0]
        if not _op_exists(torch, name):
            lib.define(schema)
    _library = lib


def _op_exists(torch, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


class _DeclareBeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_ops()
        return None  # let the normal finders import torchvision


def install() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _DeclareBeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeclareBeforeTorchvision())
