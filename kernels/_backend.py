"""Backend choice shared by the kernel launchers (``backend=`` of every launcher)."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "torch", "cpu")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, tensors: tuple[torch.Tensor, ...], *, has_triton: bool,
                    interpreted: bool) -> str:
    """The backend that runs: "auto" becomes "triton" on CUDA (when importable), else "cpu"."""
    check_backend(backend)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors are on different devices: {sorted(map(str, devices))}")
    device = next(iter(devices))
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton else "cpu"
    if backend == "triton":
        if not has_triton:
            raise RuntimeError("backend='triton' but triton is not importable")
        if device.type != "cuda" and not interpreted:
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported in this process (Triton "
                "reads it when @triton.jit runs)")
    return backend
