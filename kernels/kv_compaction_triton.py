"""GlimpsePrune's KV move on GPU: survivors' K/V written into compacted slots of a paged cache.

Layout: ``key_cache`` / ``value_cache`` are (possibly strided) views ``[num_blocks, block_size,
kv_heads, head_dim]`` — FlashAttention's ``(B, N, H, D)`` views, which vLLM 0.32 takes from its
``[num_blocks, kv_heads, block_size, 2 * head_dim]`` cache as ``kv_cache.transpose(1, 2).split(D,
-1)``. Slot ``s`` is block ``s // block_size``, row ``s % block_size``.

The sources are the K/V tensors recorded during the step (never other cache slots), so the
writes cannot race with reads even where a survivor's new slot is another survivor's old one.

* ``triton``: one program per (token, kv head), a ``BLOCK_D`` vector per store.
* ``cpu`` / ``torch``: :func:`scatter_kv_to_slots_reference` (indexed assignment), which is also
  the reference the tests compare the kernel against.
"""

from __future__ import annotations

import torch

from vllm_glimpse.kernels._backend import BACKENDS, resolve_backend

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["BACKENDS", "HAS_TRITON", "INTERPRETED", "scatter_kv_to_slots",
           "scatter_kv_to_slots_reference"]


def scatter_kv_to_slots_reference(key, value, key_cache, value_cache, slots) -> None:
    """cache[slot // bs, slot % bs] = key / value, for each of the n tokens."""
    block_size = key_cache.shape[1]
    blocks, rows = slots // block_size, slots % block_size
    key_cache[blocks, rows] = key.to(key_cache.dtype)
    value_cache[blocks, rows] = value.to(value_cache.dtype)


if HAS_TRITON:

    @triton.jit
    def _scatter_kv_kernel(
        key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slots_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kc_b, stride_kc_n, stride_kc_h, stride_vc_b, stride_vc_n, stride_vc_h,
        head_dim, block_size,
        BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0)
        head = tl.program_id(1)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        block = slot // block_size
        row = slot % block_size
        d = tl.arange(0, BLOCK_D)
        mask = d < head_dim
        k = tl.load(key_ptr + token * stride_kt + head * stride_kh + d, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + head * stride_vh + d, mask=mask)
        kc = key_cache_ptr + block * stride_kc_b + row * stride_kc_n + head * stride_kc_h + d
        vc = value_cache_ptr + block * stride_vc_b + row * stride_vc_n + head * stride_vc_h + d
        tl.store(kc, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(value_cache_ptr.dtype.element_ty), mask=mask)

# Whether @triton.jit built interpreted functions (TRITON_INTERPRET=1 when this module was
# imported): those run on CPU tensors; compiled kernels need CUDA tensors.
INTERPRETED = HAS_TRITON and not isinstance(_scatter_kv_kernel, triton.runtime.JITFunction)


def scatter_kv_to_slots(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                        value_cache: torch.Tensor, slots: torch.Tensor, *,
                        backend: str = "auto") -> None:
    """Write ``key`` / ``value`` ``[n, kv_heads, head_dim]`` at ``slots`` ``[n]`` of the caches
    ``[num_blocks, block_size, kv_heads, head_dim]`` (strided views allowed; the last dim must be
    contiguous). Slots must be in range (not checked on the Triton path: a host sync)."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must be [n, kv_heads, head_dim] alike, got "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"caches must be [num_blocks, block_size, kv_heads, head_dim] alike, got "
                         f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    if key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"tokens {tuple(key.shape)} do not fit cache rows {tuple(key_cache.shape)}")
    if slots.shape != (key.shape[0],):
        raise ValueError(f"slots must be [{key.shape[0]}], got {tuple(slots.shape)}")
    path = resolve_backend(backend, (key, value, key_cache, value_cache, slots),
                           has_triton=HAS_TRITON, interpreted=INTERPRETED)
    if path in ("torch", "cpu"):
        scatter_kv_to_slots_reference(key, value, key_cache, value_cache, slots)
        return
    n, heads, head_dim = key.shape
    if n == 0:
        return
    for t in (key, value, key_cache, value_cache):
        if t.stride(-1) != 1:
            raise ValueError("the head_dim axis must be contiguous")
    _scatter_kv_kernel[(n, heads)](
        key, value, key_cache, value_cache, slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        head_dim, key_cache.shape[1],
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
