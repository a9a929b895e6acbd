"""Where KV is moved: the survivors' K/V of layers 0..K into compacted slots.

In the step that prunes, layers 0..K wrote every prompt token's K/V at its original slot. After
the keep decision, survivor j of a request (j-th kept row) belongs at slot
``block_ids[j // block_size] * block_size + j % block_size``: the request's first
``cdiv(P', block_size)`` blocks, densely, so the tail blocks can go back to the pool.

The K/V are the post-RoPE tensors the attention layers received in this step (recorded by
:class:`AttentionRecorder`), so the survivors keep the rotary phase of their original positions.
On GPU with FlashAttention (unquantized cache) our Triton kernel writes them
(``kernels/kv_compaction_triton.py``) into the cache's ``(blocks, block_size, heads, D)`` views;
anywhere else the attention backend's own cache writer does (``impl.do_kv_cache_update``): the
CPU backend stores K/V inside a block in an ISA-dependent packed layout that only its writer
knows. Writing from the
recorded tensors (never cache to cache) is what makes the move safe when a survivor's new slot is
another survivor's old one.
"""

from __future__ import annotations

from typing import Sequence

import torch


def compacted_slots(block_ids: Sequence[int], num_kept: int, block_size: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Slots of positions 0..num_kept-1 of a request whose blocks are ``block_ids``."""
    j = torch.arange(num_kept, dtype=torch.int64)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)[j // block_size]
    return (blocks * block_size + j % block_size).to(device)


class AttentionRecorder:
    """Records the (query, key, value) an ``Attention`` module receives while ``active``.

    Installed once on the attention modules of layers 0..K (an instance-level ``forward``
    wrapper: eager mode only, which GlimpsePrune requires). Inactive, it only forwards.
    """

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn
        self.active = False
        self.query: torch.Tensor | None = None
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        inner = attn.forward

        def forward(query, key, value, *args, **kwargs):
            if self.active:
                self.query, self.key, self.value = query, key, value
            return inner(query, key, value, *args, **kwargs)

        attn.forward = forward

    def clear(self) -> None:
        self.query = self.key = self.value = None


def flash_attention_views(attn) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(key_cache, value_cache) as ``[blocks, block_size, heads, D]`` views when the layer runs
    vLLM 0.32's FlashAttention on a CUDA cache ``[blocks, heads, block_size, 2 * D]`` in the
    model's dtype (its ``do_kv_cache_update`` takes the same views); else None."""
    cache = attn.kv_cache
    if (type(attn.impl).__name__ != "FlashAttentionImpl" or attn.impl.kv_cache_dtype != "auto"
            or not isinstance(cache, torch.Tensor) or not cache.is_cuda or cache.dim() != 4
            or cache.shape[-1] != 2 * attn.head_size):
        return None
    return tuple(cache.transpose(1, 2).split(attn.head_size, dim=-1))


def compact_kv(recorders: Sequence[AttentionRecorder], rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Write rows ``rows`` of each recorded layer's K/V to ``slots`` of that layer's cache."""
    if rows.numel() == 0:
        return
    from vllm_glimpse.kernels.kv_compaction_triton import scatter_kv_to_slots

    for rec in recorders:
        attn = rec.attn
        key = rec.key.view(-1, attn.num_kv_heads, attn.head_size)[rows]
        value = rec.value.view(-1, attn.num_kv_heads, attn.head_size_v)[rows]
        views = flash_attention_views(attn)
        if views is not None:
            scatter_kv_to_slots(key, value, *views, slots)
        else:
            attn.impl.do_kv_cache_update(attn, key, value, attn.kv_cache, slots)
