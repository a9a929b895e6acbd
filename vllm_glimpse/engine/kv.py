"""Where KV is moved: the survivors' K/V of layers 0..K into compacted slots.

In the step that prunes, layers 0..K wrote every prompt token's K/V at its original slot. After
the keep decision, survivor j of a request (j-th kept row) belongs at slot
``block_ids[j // block_size] * block_size + j % block_size``: the request's first
``cdiv(P', block_size)`` blocks, densely, so the tail blocks can go back to the pool.

Memory: nothing but the glimpse rows' queries is held while layers 0..K run. After the decision
each layer's survivors' K/V are read back from the paged cache (:class:`PagedKV`), then written
to their new slots; one layer's survivors at a time, every read of a layer before its first write
(a survivor's new slot can be another survivor's old one). Reading back is exact: the cache holds
the post-RoPE K/V the layer wrote, in the model's dtype (quantized caches are not read back).

* FlashAttention (GPU, unquantized): the cache is ``[blocks, heads, block_size, 2 * D]``; its
  ``(blocks, block_size, heads, D)`` views are read by indexing and written by our Triton kernel
  (``kernels/kv_compaction_triton.py``).
* CPU attention: K/V inside a block are stored in an ISA-dependent packed layout that only the
  backend's writer (``impl.do_kv_cache_update``) knows. :func:`probe_block_layout` learns it once
  per layer shape: it writes known index patterns through that writer into a two-block scratch
  cache, derives where each (token, head, channel) of K and V lands inside a block, and checks the
  result round-trips random values. Reads then gather with that permutation; writes go through
  the backend's writer.
* Anything else (or a probe that fails): the layers' K/V of the step are recorded while they run
  (:class:`AttentionRecorder` with ``keep_kv``) and written from there, with the reason logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_glimpse.settings import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)


class AttentionRecorder:
    """Records what the prune step needs from an ``Attention`` module's inputs while ``active``.

    * ``query_rows`` (a row-index tensor): the query of those rows (the glimpse tokens), kept as a
      small copy ``[len(rows), heads * D]``;
    * ``keep_kv``: the whole K and V of the step (only when the cache cannot be read back).

    Installed once on the attention modules of layers 0..K (an instance-level ``forward``
    wrapper: eager mode only, which GlimpsePrune requires). Inactive, it only forwards.
    """

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn
        self.active = False
        self.query_rows: torch.Tensor | None = None
        self.keep_kv = False
        self.query: torch.Tensor | None = None
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        inner = attn.forward

        def forward(query, key, value, *args, **kwargs):
            if self.active:
                if self.query_rows is not None:
                    self.query = query.index_select(0, self.query_rows)
                if self.keep_kv:
                    self.key, self.value = key, value
            return inner(query, key, value, *args, **kwargs)

        attn.forward = forward

    def clear(self) -> None:
        self.query = self.key = self.value = None
        self.query_rows = None
        self.keep_kv = False


def flash_attention_views(attn) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(key_cache, value_cache) as ``[blocks, block_size, heads, D]`` views when the layer runs
    vLLM 0.32's FlashAttention on a CUDA cache ``[blocks, heads, block_size, 2 * D]`` in the
    model's dtype (its ``do_kv_cache_update`` takes the same views); else None.

    A CPU cache also qualifies when the Triton kernels run under Triton's interpreter
    (``TRITON_INTERPRET=1`` when they were imported): the interpreter runs them on CPU tensors,
    so the tests can drive this exact path (views, fused scoring, scatter) without a GPU."""
    cache = attn.kv_cache
    if (type(attn.impl).__name__ != "FlashAttentionImpl" or attn.impl.kv_cache_dtype != "auto"
            or not isinstance(cache, torch.Tensor) or cache.dim() != 4
            or cache.shape[-1] != 2 * attn.head_size
            or not (cache.is_cuda or _triton_interpreted())):
        return None
    return tuple(cache.transpose(1, 2).split(attn.head_size, dim=-1))


def _triton_interpreted() -> bool:
    """Whether our Triton kernels were built by the interpreter (imported lazily: only a
    FlashAttention layer on a CPU cache, i.e. a test, gets here)."""
    from vllm_glimpse.kernels.kv_compaction_triton import INTERPRETED

    return INTERPRETED


# -------------------------------------------------------------------------------------------------
# Reading K/V back from a packed cache block (CPU attention)
# -------------------------------------------------------------------------------------------------

#: Probe values are digits 1..64 (K) and -1..-64 (V): integers this small are exact in float16,
#: bfloat16 (8 significant bits) and float32, so a value read back names its digit unambiguously.
PROBE_DIGIT_BASE = 64
#: Elements per chunk when gathering from packed blocks: bounds the int64 element-index
#: temporaries (8 bytes per element gathered, 4x bf16 K/V) at 1 MB whatever the head count
#: (256 slots at 4 KV heads x 128, 32 slots at LLaVA-1.5-7B's 32 x 128).
GATHER_CHUNK_ELEMENTS = 128 * 1024


def affine_strides(index: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(base, row, head, channel)`` element strides when ``index [rows, heads, D]`` is
    ``base + row * r + head * h + channel * c`` with non-negative strides (vLLM 0.32's CPU cache:
    K channel-major, ``[heads, D, block]``; V token-major, ``[heads, block, D]``), else None."""
    rows, heads, width = index.shape
    base = int(index[0, 0, 0])
    steps = [int(index[1, 0, 0]) - base if rows > 1 else 0,
             int(index[0, 1, 0]) - base if heads > 1 else 0,
             int(index[0, 0, 1]) - base if width > 1 else 0]
    if min(steps) < 0:
        return None
    grid = [torch.arange(n, device=index.device) for n in index.shape]
    affine = (base + grid[0][:, None, None] * steps[0] + grid[1][None, :, None] * steps[1]
              + grid[2][None, None, :] * steps[2])
    return (base, *steps) if torch.equal(affine, index) else None


@dataclass(frozen=True)
class BlockLayout:
    """Where K/V element (row, head, channel) of a block lives among the block's elements:
    ``key_index [block_size, heads, D]`` / ``value_index [block_size, heads, Dv]`` (int64 offsets
    into ``cache.view(num_blocks, -1)[block]``). Where an index is affine (:func:`affine_strides`),
    reads go through a strided view of the cache, a copy of whole (row, head) runs instead of an
    element-by-element gather."""

    block_size: int
    key_index: torch.Tensor
    value_index: torch.Tensor
    key_strides: tuple[int, int, int, int] | None = dataclasses.field(init=False, default=None)
    value_strides: tuple[int, int, int, int] | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_strides", affine_strides(self.key_index))
        object.__setattr__(self, "value_strides", affine_strides(self.value_index))

    def gather(self, cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather_keys(cache, slots), \
            self.gather_one(cache, slots, self.value_index, self.value_strides)

    def gather_keys(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.gather_one(cache, slots, self.key_index, self.key_strides)

    def gather_one(self, cache: torch.Tensor, slots: torch.Tensor, index: torch.Tensor,
                   strides: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """``cache``'s elements ``index[slot % block_size]`` of block ``slot // block_size``, for
        each slot: ``[n, heads, D]``. ``strides``: :func:`affine_strides` of ``index``, for the
        strided read. Otherwise the element indices are int64, 4x the size of bf16 K/V, so they
        are built a chunk of slots at a time (bounded memory, whatever n)."""
        flat = cache.view(cache.shape[0], -1)
        slots = slots.long()
        if strides is not None:
            base, *steps = strides
            view = flat.as_strided((flat.shape[0], *index.shape), (flat.stride(0), *steps),
                                   flat.storage_offset() + base)
            return view[slots // self.block_size, slots % self.block_size]
        out = flat.new_empty(slots.shape[0], *index.shape[1:])
        step = max(1, GATHER_CHUNK_ELEMENTS // max(1, index[0].numel()))
        for start in range(0, slots.shape[0], step):
            part = slots[start:start + step]
            out[start:start + part.shape[0]] = flat[(part // self.block_size)[:, None, None],
                                                    index[part % self.block_size]]
        return out


def _writer(attn):
    def write(key, value, cache, slots):
        attn.impl.do_kv_cache_update(attn, key, value, cache, slots)
    return write


def probe_block_layout(write, cache_block_shape: Sequence[int], dtype: torch.dtype,
                       device: torch.device | str, block_size: int, num_kv_heads: int,
                       head_size: int, head_size_v: int) -> BlockLayout | str:
    """Learn a cache writer's element layout inside one block.

    ``write(key [n, heads, D], value [n, heads, Dv], cache, slots [n])`` is the backend's writer;
    ``cache_block_shape`` the shape of one block of its cache (``kv_cache.shape[1:]``). Returns the
    layout, or a one-line reason why the writer's layout is not a fixed per-block permutation of
    (row, head, channel) for K and V (then the caller keeps the step's K/V instead)."""
    block_elems = math.prod(cache_block_shape)
    need = block_size * num_kv_heads * (head_size + head_size_v)
    if block_elems != need:
        return (f"a cache block holds {block_elems} elements, not block_size x heads x (D + Dv) "
                f"= {need}")
    scratch = torch.zeros((2, *cache_block_shape), dtype=dtype, device=device)
    slots = torch.arange(block_size, 2 * block_size, device=device)
    index = {  # (row, head, channel) grids for K and V
        "key": torch.meshgrid(torch.arange(block_size), torch.arange(num_kv_heads),
                              torch.arange(head_size), indexing="ij"),
        "value": torch.meshgrid(torch.arange(block_size), torch.arange(num_kv_heads),
                                torch.arange(head_size_v), indexing="ij"),
    }
    sizes = (block_size, num_kv_heads, max(head_size, head_size_v))
    decoded = [torch.zeros(block_elems, dtype=torch.int64) for _ in range(3)]
    sign = None
    for field, size in enumerate(sizes):
        digits = max(1, math.ceil(math.log(size, PROBE_DIGIT_BASE))) if size > 1 else 1
        for digit in range(digits):
            place = PROBE_DIGIT_BASE ** digit
            k = (index["key"][field] // place % PROBE_DIGIT_BASE + 1).to(dtype)
            v = -(index["value"][field] // place % PROBE_DIGIT_BASE + 1).to(dtype)
            scratch.zero_()
            write(k.to(device), v.to(device), scratch, slots)
            if bool(scratch[0].ne(0).any()):
                return "the writer changed a block it was given no slot in"
            got = scratch[1].reshape(-1).float().cpu()
            if not bool(torch.equal(got, got.round())) or bool((got == 0).any()) \
                    or bool((got.abs() > PROBE_DIGIT_BASE).any()):
                return "values written were not stored exactly (a quantized or transformed cache)"
            now = got > 0
            if sign is None:
                sign = now
            elif not torch.equal(sign, now):
                return "K and V elements did not stay in place between writes"
            decoded[field] += (got.abs().long() - 1) * place
    rows, heads, channels = decoded
    layout = {}
    for name, is_kind, width in (("key", sign, head_size), ("value", ~sign, head_size_v)):
        positions = torch.nonzero(is_kind).squeeze(-1)
        count = block_size * num_kv_heads * width
        if positions.numel() != count:
            return f"{positions.numel()} elements of a block hold {name}s, expected {count}"
        r, h, c = rows[positions], heads[positions], channels[positions]
        if bool((r >= block_size).any() | (h >= num_kv_heads).any() | (c >= width).any()):
            return f"a decoded {name} index is out of range"
        flat = (r * num_kv_heads + h) * width + c
        table = torch.full((count,), -1, dtype=torch.int64)
        table[flat] = positions
        if bool((table < 0).any()):
            return f"two elements of a block hold the same {name} entry"
        layout[name] = table.view(block_size, num_kv_heads, width).to(device)
    result = BlockLayout(block_size, layout["key"], layout["value"])
    # Round trip: random values through the writer come back where the layout says.
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(block_size, num_kv_heads, head_size, generator=gen).to(dtype).to(device)
    value = torch.randn(block_size, num_kv_heads, head_size_v, generator=gen).to(dtype).to(device)
    scratch.zero_()
    order = torch.randperm(block_size, generator=gen).to(device)
    write(key[order], value[order], scratch, slots[order])
    got_k, got_v = result.gather(scratch, slots)
    if not (torch.equal(got_k, key) and torch.equal(got_v, value)):
        return "random K/V written by the writer did not read back through the derived layout"
    return result


_LAYOUTS: dict[tuple, BlockLayout | str] = {}


def cpu_block_layout(attn, block_size: int) -> BlockLayout | str:
    """:func:`probe_block_layout` for a vLLM attention layer's cache, cached per layout key."""
    cache = attn.kv_cache
    impl = attn.impl
    if getattr(impl, "kv_cache_dtype", "auto") != "auto":
        return f"quantized KV cache ({impl.kv_cache_dtype})"
    if not isinstance(cache, torch.Tensor) or cache.dim() < 2:
        return "the layer's cache is not one tensor"
    if not cache[0].is_contiguous() or cache.stride(0) != cache[0].numel():
        return "cache blocks are not contiguous"
    # ``attn.isa``: the CPU backend's metadata builder sets it on every layer (vLLM 0.32,
    # ``CPUAttentionMetadataBuilder._set_isa_to_layers``); the packed layout depends on it.
    key = (type(impl).__qualname__, getattr(attn, "isa", None), tuple(cache.shape[1:]),
           cache.dtype, cache.device.type, block_size, attn.num_kv_heads, attn.head_size,
           attn.head_size_v)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = probe_block_layout(
            _writer(attn), cache.shape[1:], cache.dtype, cache.device, block_size,
            attn.num_kv_heads, attn.head_size, attn.head_size_v)
    return _LAYOUTS[key]


# -------------------------------------------------------------------------------------------------
# One layer's paged K/V: read back, write
# -------------------------------------------------------------------------------------------------


class PagedKV:
    """Reads and writes one attention layer's paged K/V by slot, whatever the backend."""

    def __init__(self, attn, block_size: int,
                 views: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``attn``: vLLM's attention layer; or ``views`` alone: plain ``[blocks, block_size,
        heads, D]`` key and value caches (FlashAttention's layout, as in the benchmarks)."""
        self.attn = attn
        self.block_size = block_size
        self.views = views if views is not None else flash_attention_views(attn)
        self.layout: BlockLayout | None = None
        self.unreadable: str | None = None  # why the cache cannot be read back
        if self.views is None:
            found = cpu_block_layout(attn, block_size)
            if isinstance(found, str):
                self.unreadable = found
            else:
                self.layout = found

    @property
    def readable(self) -> bool:
        return self.unreadable is None

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of (key [n, heads, D], value [n, heads, Dv]) at ``slots``."""
        if self.views is not None:
            slots = slots.long()
            blocks, rows = slots // self.block_size, slots % self.block_size
            return self.views[0][blocks, rows], self.views[1][blocks, rows]
        return self.layout.gather(self.attn.kv_cache, slots)

    def read_keys(self, slots: torch.Tensor) -> torch.Tensor:
        if self.views is not None:
            slots = slots.long()
            return self.views[0][slots // self.block_size, slots % self.block_size]
        return self.layout.gather_keys(self.attn.kv_cache, slots)

    def write(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        if self.views is not None:
            from vllm_glimpse.kernels.kv_compaction_triton import scatter_kv_to_slots

            scatter_kv_to_slots(key, value, *self.views, slots)
        else:
            attn = self.attn
            attn.impl.do_kv_cache_update(attn, key, value, attn.kv_cache, slots)


def move_kv(layers: Sequence[PagedKV], recorders: Sequence[AttentionRecorder],
            old_slots: torch.Tensor, new_slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Survivors' K/V of every layer from ``old_slots`` to ``new_slots`` (``rows``: their rows in
    the step, for layers whose K/V were recorded instead). One layer at a time: all of a layer's
    survivors are read (copies) before any of them is written."""
    if new_slots.numel() == 0:
        return
    for kv, rec in zip(layers, recorders):
        if kv.readable:
            key, value = kv.read(old_slots)
        else:
            attn = kv.attn
            key = rec.key.view(-1, attn.num_kv_heads, attn.head_size)[rows]
            value = rec.value.view(-1, attn.num_kv_heads, attn.head_size_v)[rows]
        kv.write(key, value, new_slots)
        del key, value
