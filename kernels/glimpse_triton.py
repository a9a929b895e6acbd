"""Triton kernels for GlimpsePrune (arXiv 2508.01548): the glimpse token's attention logits against
every image key of every request of a batch, read straight from the paged KV cache, and the keep
rule's masking plus stream compaction for all requests at once. Each with its CPU path and a
plainly written torch reference.

Backends (as in :mod:`vllm_glimpse.kernels.visionzip_triton`), chosen by ``backend=``:

- ``"triton"``: the Triton kernels. CUDA tensors, or CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1`` before triton is first imported in the process).
- ``"cpu"``: vectorised torch (gathers from the cache tensor; for the top-k, a stable sort of
  each request that needs one); device-agnostic, but it synchronises with the host
  (``nonzero``, validation). The engine's path on CPU.
- ``"torch"``: the reference: a loop over requests, gathering one key at a time from the paged
  cache, the engine's :func:`vllm_glimpse.glimpse.modules.glimpse_attention_scores` for the
  logits and :func:`vllm_glimpse.glimpse.keep_rule.keep_mask` for the rule.
- ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton is importable, else ``"cpu"``.

Public API::

    glimpse_attention_logits(glimpse_q, key_cache, block_table, image_positions, image_offsets,
                             scale=None, *, seq_lens=None, backend="auto")     # float32 [T, H]
    glimpse_attention_logits_reference(...)                                   # same arguments
    keep_and_compact(scores, offsets, *, threshold=0.5, max_remain_ratio=None, min_remain_num=1,
                     fixed_remain_ratio=None, force_keep=None, trim=True,
                     backend="auto")                                           # KeepResult
    keep_and_compact_reference(...)
    HAS_TRITON, INTERPRETED, BACKENDS

Layout (vLLM's FlashAttention backend): ``key_cache [num_blocks, block_size, num_kv_heads,
head_dim]`` with any strides (vLLM 0.32's cache ``[num_blocks, num_kv_heads, block_size,
2 * head_dim]`` gives it as ``kv_cache.transpose(1, 2).split(head_dim, -1)[0]``),
``block_table [B, max_blocks]`` (int32 in vLLM); token ``p`` of request ``b`` lives at
``key_cache[block_table[b, p // block_size], p % block_size]``. fp8 caches are not supported
(they need the layer's k_scale). The CPU attention backend packs K/V in an ISA-dependent layout:
on CPU give these functions the post-RoPE keys in the plain layout above, not
``layer.kv_cache`` (the engine's CPU path reads them back through the probed block layout of
:mod:`vllm_glimpse.engine.kv` and scores them a request at a time).

Used by the engine's prune step (:mod:`vllm_glimpse.engine.prune_step`): the logits on a
FlashAttention cache, ``keep_and_compact`` for every request's keep rule (``trim=False``).

Host synchronisation on the Triton path: none in :func:`glimpse_attention_logits`; in
:func:`keep_and_compact` exactly one, only with ``trim=True`` (the default): reading the total kept
count to cut ``kept_index`` to its length. With ``trim=False`` it returns ``[T]``-sized buffers
whose tail (from ``kept_offsets[-1]`` on) holds -1, and nothing waits for the device (pass
per-request rule parameters as device tensors). Top-k ranks come from two stable sorts of the
whole batch (O(T log T)), not from pairwise counting. Inputs are
not validated on the Triton path (that would need syncs): positions beyond a request's blocks,
offsets that do not add up, or NaN scores give unspecified results there; the CPU and torch
paths raise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vllm_glimpse.glimpse.keep_rule import keep_mask as _keep_mask_rule
from vllm_glimpse.glimpse.modules import glimpse_attention_scores as _glimpse_attention_scores
from vllm_glimpse.kernels._backend import BACKENDS, resolve_backend

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton
    triton = None
    tl = None
    HAS_TRITON = False


__all__ = [
    "BACKENDS", "HAS_TRITON", "INTERPRETED", "KeepResult",
    "glimpse_attention_logits", "glimpse_attention_logits_reference",
    "keep_and_compact", "keep_and_compact_reference",
]


def _resolve(backend: str, *tensors: torch.Tensor) -> str:
    return resolve_backend(backend, tensors, has_triton=HAS_TRITON, interpreted=INTERPRETED)


# -------------------------------------------------------------------------------------------------
# 1. Glimpse attention logits from the paged KV cache
# -------------------------------------------------------------------------------------------------


class _LogitsShapes(NamedTuple):
    batch: int
    heads: int
    dim: int
    kv_heads: int
    block_size: int
    total: int


def _check_logits_args(glimpse_q, key_cache, block_table, image_positions, image_offsets,
                       seq_lens) -> _LogitsShapes:
    if glimpse_q.dim() != 3:
        raise ValueError(f"glimpse_q must be [B, H, D], got {tuple(glimpse_q.shape)}")
    if key_cache.dim() != 4:
        raise ValueError("key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got "
                         f"{tuple(key_cache.shape)}")
    batch, heads, dim = glimpse_q.shape
    _, block_size, kv_heads, kdim = key_cache.shape
    if kdim != dim:
        raise ValueError(f"query head dim {dim} != key head dim {kdim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split over {kv_heads} KV heads")
    if not glimpse_q.is_floating_point() or not key_cache.is_floating_point() \
            or key_cache.dtype.itemsize < 2:
        raise ValueError(f"glimpse_q and key_cache must be 16/32-bit floating tensors (no fp8 caches), "
                         f"got {glimpse_q.dtype}, {key_cache.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.is_floating_point():
        raise ValueError(f"block_table must be an integer [B={batch}, max_blocks] tensor, got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if image_positions.dim() != 1 or image_positions.is_floating_point():
        raise ValueError(f"image_positions must be a 1-D integer tensor, got {tuple(image_positions.shape)}")
    if image_offsets.shape != (batch + 1,) or image_offsets.is_floating_point():
        raise ValueError(f"image_offsets must be an integer [B+1={batch + 1}] tensor, got "
                         f"{tuple(image_offsets.shape)}")
    if seq_lens is not None and (seq_lens.shape != (batch,) or seq_lens.is_floating_point()):
        raise ValueError(f"seq_lens must be an integer [B={batch}] tensor, got {tuple(seq_lens.shape)}")
    return _LogitsShapes(batch, heads, dim, kv_heads, block_size, image_positions.shape[0])


def _validate_logits_values(shapes: _LogitsShapes, key_cache, block_table, image_positions,
                            image_offsets, seq_lens) -> None:
    """Host-side value checks of the CPU and torch paths (they synchronise on CUDA)."""
    offsets = image_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != shapes.total or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"image_offsets {offsets} must rise from 0 to {shapes.total}")
    capacity = block_table.shape[1] * shapes.block_size
    limits = seq_lens.tolist() if seq_lens is not None else [capacity] * shapes.batch
    if any(n < 0 or n > capacity for n in limits):
        raise ValueError(f"seq_lens {limits} exceed the block table's {capacity} slots")
    positions = image_positions.tolist()
    for b in range(shapes.batch):
        mine = positions[offsets[b]:offsets[b + 1]]
        if mine and (min(mine) < 0 or max(mine) >= limits[b]):
            raise ValueError(f"request {b}: image positions must lie in [0, {limits[b]}), got "
                             f"[{min(mine)}, {max(mine)}]")
        needed = math.ceil(limits[b] / shapes.block_size) if seq_lens is not None else (
            max(mine) // shapes.block_size + 1 if mine else 0)
        blocks = block_table[b, :needed]
        if needed and (int(blocks.min()) < 0 or int(blocks.max()) >= key_cache.shape[0]):
            raise ValueError(f"request {b}: block ids outside [0, {key_cache.shape[0]})")


def _read_key(key_cache: torch.Tensor, block_table: torch.Tensor, b: int, p: int) -> torch.Tensor:
    block_size = key_cache.shape[1]
    return key_cache[int(block_table[b, p // block_size]), p % block_size]  # [KVH, D]


def glimpse_attention_logits_reference(
    glimpse_q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    image_positions: torch.Tensor,
    image_offsets: torch.Tensor,
    scale: float | None = None,
    *,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`glimpse_attention_logits`: per request, its keys gathered one
    position at a time, then the engine's ``glimpse_attention_scores`` in float32."""
    shapes = _check_logits_args(glimpse_q, key_cache, block_table, image_positions, image_offsets,
                                seq_lens)
    _validate_logits_values(shapes, key_cache, block_table, image_positions, image_offsets, seq_lens)
    scale = shapes.dim ** -0.5 if scale is None else float(scale)
    offsets = image_offsets.tolist()
    out = []
    for b in range(shapes.batch):
        positions = image_positions[offsets[b]:offsets[b + 1]].tolist()
        if not positions:
            continue
        query = glimpse_q[b].float()
        if seq_lens is None:  # raw logits (Qwen): only the image keys are needed
            keys = torch.stack([_read_key(key_cache, block_table, b, p) for p in positions]).float()
            index = torch.arange(len(positions))
        else:  # log_softmax over the whole sequence (LLaVA), then the image columns
            keys = torch.stack([_read_key(key_cache, block_table, b, p)
                                for p in range(int(seq_lens[b]))]).float()
            index = torch.tensor(positions)
        out.append(_glimpse_attention_scores(query, keys, index.to(keys.device),
                                             use_attention_logits=seq_lens is None, scale=scale))
    if not out:
        return torch.zeros(0, shapes.heads, dtype=torch.float32, device=glimpse_q.device)
    return torch.cat(out)


def _token_requests(image_offsets: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [T]: the request of each flattened image token (sync-free; empty requests skipped)."""
    tokens = torch.arange(total, device=image_offsets.device)
    return torch.searchsorted(image_offsets.long(), tokens, right=True) - 1


def _logits_cpu(glimpse_q, key_cache, block_table, image_positions, image_offsets, scale, seq_lens,
                shapes: _LogitsShapes) -> torch.Tensor:
    """Vectorised torch, GQA by viewing query heads as groups. Raw logits: one gather of all
    image keys. log_softmax (LLaVA): per request, one gather of its keys, whose logits give both
    the logsumexp and, indexed, the image columns (a request at a time: padding the batch to its
    longest sequence in float32 is memory-bound on a CPU)."""
    _validate_logits_values(shapes, key_cache, block_table, image_positions, image_offsets, seq_lens)
    group = shapes.heads // shapes.kv_heads
    bs = shapes.block_size
    pos = image_positions.long()
    q = glimpse_q.float().view(shapes.batch, shapes.kv_heads, group, shapes.dim)
    if seq_lens is None:
        req = _token_requests(image_offsets, shapes.total)
        keys = key_cache[block_table[req, pos // bs].long(), pos % bs].float()  # [T, KVH, D]
        return torch.einsum("tkgd,tkd->tkg", q[req], keys).reshape(shapes.total, shapes.heads) * scale
    offsets = image_offsets.tolist()
    out = [torch.zeros(0, shapes.heads, dtype=torch.float32, device=glimpse_q.device)]
    for b, length in enumerate(seq_lens.tolist()):
        if offsets[b] == offsets[b + 1]:
            continue
        p = torch.arange(length, device=key_cache.device)
        keys = key_cache[block_table[b, p // bs].long(), p % bs].float()  # [S, KVH, D]
        logits = torch.einsum("kgd,skd->skg", q[b], keys).reshape(length, shapes.heads) * scale
        out.append(logits[pos[offsets[b]:offsets[b + 1]]] - torch.logsumexp(logits, dim=0))
    return torch.cat(out)


if HAS_TRITON:

    @triton.jit
    def _sequence_lse_kernel(
        q_ptr, k_ptr, bt_ptr, seq_lens_ptr, lse_ptr, H, D, PAGE, scale,
        stride_qb, stride_qh, stride_qd,
        stride_kn, stride_ks, stride_kh, stride_kd,
        stride_btb, stride_btn,
        GROUP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (request b, query head h): lse[b, h] = logsumexp over positions
        p < seq_lens[b] of q[b, h] . k(p) * scale, keys read through the block table. Online
        max / sum-exp kept per lane (fp32), folded at the end."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        n = tl.load(seq_lens_ptr + b).to(tl.int32)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_mask,
                    other=0.0).to(tl.float32)
        lane_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
        lane_sum = tl.zeros([BLOCK_S], tl.float32)
        for start in range(0, n, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            s_mask = offs < n
            block = tl.load(bt_ptr + b * stride_btb + (offs // PAGE) * stride_btn, mask=s_mask,
                            other=0).to(tl.int64)
            slot = (offs % PAGE).to(tl.int64)
            k = tl.load(k_ptr + block[:, None] * stride_kn + slot[:, None] * stride_ks
                        + kvh * stride_kh + offs_d[None, :] * stride_kd,
                        mask=s_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            logit = tl.sum(k * q[None, :], axis=1) * scale
            logit = tl.where(s_mask, logit, float("-inf"))
            new_max = tl.maximum(lane_max, logit)
            # Lanes that have seen no key yet stay at (-inf, 0) instead of exp(-inf - -inf) = NaN.
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(logit - safe)
            lane_max = new_max
        top = tl.max(lane_max, axis=0)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(lane_sum * tl.exp(lane_max - safe_top), axis=0)
        tl.store(lse_ptr + b * H + h, top + tl.log(total))

    @triton.jit
    def _glimpse_logits_kernel(
        q_ptr, k_ptr, bt_ptr, pos_ptr, req_ptr, lse_ptr, out_ptr, T, H, D, PAGE, scale,
        stride_qb, stride_qh, stride_qd,
        stride_kn, stride_ks, stride_kh, stride_kd,
        stride_btb, stride_btn,
        stride_ot, stride_oh,
        GROUP: tl.constexpr, HAS_LSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (block of flattened image tokens, KV head): each token's key is read
        once from its page and dotted with the GROUP query heads that share this KV head (GQA)
        of the token's own request; out[t, h] = q[b_t, h] . k(t) * scale (- lse[b_t, h])."""
        offs_t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kvh = tl.program_id(1)
        t_mask = offs_t < T
        pos = tl.load(pos_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
        req = tl.load(req_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
        block = tl.load(bt_ptr + req * stride_btb + (pos // PAGE) * stride_btn, mask=t_mask,
                        other=0).to(tl.int64)
        slot = pos % PAGE
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        mask2 = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kn + slot[:, None] * stride_ks
                    + kvh * stride_kh + offs_d[None, :] * stride_kd, mask=mask2, other=0.0).to(tl.float32)
        for g in tl.static_range(GROUP):
            h = kvh * GROUP + g
            q = tl.load(q_ptr + req[:, None] * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd,
                        mask=mask2, other=0.0).to(tl.float32)
            logit = tl.sum(q * k, axis=1) * scale
            if HAS_LSE:
                logit = logit - tl.load(lse_ptr + req * H + h, mask=t_mask, other=0.0)
            tl.store(out_ptr + offs_t * stride_ot + h * stride_oh, logit, mask=t_mask)


def _next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def glimpse_attention_logits(
    glimpse_q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    image_positions: torch.Tensor,
    image_offsets: torch.Tensor,
    scale: float | None = None,
    *,
    seq_lens: torch.Tensor | None = None,
    backend: str = "auto",
    block_n: int = 64,
    block_s: int = 64,
) -> torch.Tensor:
    """The VIP's attention input for a whole batch at the pruning layer: float32 ``[T, H]``.

    ``glimpse_q [B, H, D]``: each request's glimpse-token query (post-RoPE) at layer K.
    ``key_cache [num_blocks, block_size, KVH, D]`` and ``block_table [B, max_blocks]``: the paged
    keys of layer K (see the module docstring). ``image_positions [T]``: the sequence positions of
    every request's image tokens, request after request (``image_offsets [B+1]``: request b owns
    ``image_positions[image_offsets[b]:image_offsets[b+1]]``; a request may own none).

    Row t (request b, position p) is ``q[b, h] . k(p)[h // (H / KVH)] * scale`` (``scale``
    defaults to ``D ** -0.5``): Qwen2.5-VL's raw logits. With ``seq_lens [B]`` (LLaVA) the
    per-(b, h) logsumexp over all keys of positions ``0 .. seq_lens[b] - 1`` (the glimpse token's
    own key included: it must already be in the cache) is subtracted: ``log_softmax`` over the
    sequence, then the image columns. Computed in float32 whatever the input dtype.
    """
    shapes = _check_logits_args(glimpse_q, key_cache, block_table, image_positions, image_offsets,
                                seq_lens)
    tensors = [glimpse_q, key_cache, block_table, image_positions, image_offsets]
    path = _resolve(backend, *tensors, *([] if seq_lens is None else [seq_lens]))
    if path == "torch":
        return glimpse_attention_logits_reference(glimpse_q, key_cache, block_table, image_positions,
                                                  image_offsets, scale, seq_lens=seq_lens)
    scale = shapes.dim ** -0.5 if scale is None else float(scale)
    if path == "cpu":
        return _logits_cpu(glimpse_q, key_cache, block_table, image_positions, image_offsets, scale,
                           seq_lens, shapes)
    device = glimpse_q.device
    out = torch.empty(shapes.total, shapes.heads, dtype=torch.float32, device=device)
    if shapes.total == 0:
        return out
    if shapes.dim > 256:
        raise ValueError(f"head dim {shapes.dim} > 256 is not supported by the Triton kernels")
    group = shapes.heads // shapes.kv_heads
    block_d = _next_pow2(shapes.dim)
    q_strides = glimpse_q.stride()
    k_strides = key_cache.stride()
    bt_strides = block_table.stride()
    lse = out  # placeholder pointer when HAS_LSE is false (never read)
    if seq_lens is not None:
        lse = torch.empty(shapes.batch, shapes.heads, dtype=torch.float32, device=device)
        _sequence_lse_kernel[(shapes.batch, shapes.heads)](
            glimpse_q, key_cache, block_table, seq_lens, lse, shapes.heads, shapes.dim,
            shapes.block_size, scale, *q_strides, *k_strides, *bt_strides,
            GROUP=group, BLOCK_S=block_s, BLOCK_D=block_d)
    req = _token_requests(image_offsets, shapes.total)
    _glimpse_logits_kernel[(triton.cdiv(shapes.total, block_n), shapes.kv_heads)](
        glimpse_q, key_cache, block_table, image_positions, req, lse, out, shapes.total,
        shapes.heads, shapes.dim, shapes.block_size, scale, *q_strides, *k_strides, *bt_strides,
        *out.stride(), GROUP=group, HAS_LSE=seq_lens is not None, BLOCK_N=block_n, BLOCK_D=block_d)
    return out


# -------------------------------------------------------------------------------------------------
# 2. Keep rule over all requests, then stream compaction
# -------------------------------------------------------------------------------------------------


class KeepResult(NamedTuple):
    """What :func:`keep_and_compact` returns.

    ``keep_mask`` bool [T]; ``kept_index`` long: flat indices (into the T scores) of the kept
    tokens, ascending, request after request; ``kept_local`` long: the same tokens' indices within
    their request's image tokens; ``kept_offsets`` long [B+1]: request b's kept tokens are
    ``kept_index[kept_offsets[b]:kept_offsets[b+1]]``. With ``trim=False`` kept_index and
    kept_local are [T] long and hold -1 from ``kept_offsets[-1]`` on.
    """

    keep_mask: torch.Tensor
    kept_index: torch.Tensor
    kept_local: torch.Tensor
    kept_offsets: torch.Tensor


def _per_request(value, batch: int, dtype: torch.dtype, device, none_value) -> torch.Tensor:
    """A rule parameter as a [B] tensor on ``device``: scalars broadcast, None (also inside a
    sequence) becomes ``none_value`` (NaN for the ratios, 0 for min_remain_num: both mean "not
    set"). Nothing here waits for the device: tensors are converted where they are, scalars are
    filled on the device, sequences are copied without blocking."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"a per-request rule parameter must be [B={batch}], got {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype, non_blocking=True)
    if value is None or isinstance(value, (int, float)):
        return torch.full((batch,), none_value if value is None else value, dtype=dtype,
                          device=device)
    value = [none_value if v is None else v for v in value]
    if len(value) != batch:
        raise ValueError(f"got {len(value)} per-request rule parameters for {batch} requests")
    return torch.tensor(value, dtype=dtype).to(device, non_blocking=True)


def _rule_params(batch, device, threshold, max_remain_ratio, min_remain_num, fixed_remain_ratio):
    # The threshold as float32: torch compares a float32 tensor with a Python float in float32,
    # which is what the rule (sigmoid(x) > threshold) does.
    thr = _per_request(threshold, batch, torch.float32, device, float("nan"))
    max_r = _per_request(max_remain_ratio, batch, torch.float64, device, float("nan"))
    min_n = _per_request(min_remain_num, batch, torch.int64, device, 0)
    fixed = _per_request(fixed_remain_ratio, batch, torch.float64, device, float("nan"))
    return thr, max_r, min_n, fixed


def _plan(scores: torch.Tensor, offsets: torch.Tensor, thr, max_r, min_n, fixed):
    """The per-request decisions of the rule, sync-free, in the rule's own arithmetic.

    Returns (x float32 [T], above [T] bool, req [T] long, use_above [B] bool, rank_limit [B]
    long): the keep mask is ``(use_above[b] & above) | (rank < rank_limit[b])``, rank being the
    position in the request's (logit descending, index ascending) order. Derivation from
    keep_rule.keep_mask: fixed ratio r: top k_f = clamp(int(r N), 1, N) only; else
    above-threshold, replaced by the top k_c = clamp(int(r N), 1, N) when kept / N > r (float64,
    as Python divides), then ORed with the top k_m = clamp(m, 1, N) when the count so far is < m,
    and top(a) | top(b) = top(max).
    """
    x = scores.float()
    offsets = offsets.long()
    n = offsets[1:] - offsets[:-1]
    req = _token_requests(offsets, x.shape[0])
    above = torch.sigmoid(x) > thr[req]  # NaN threshold (only with a fixed ratio) -> False
    prefix = torch.cat([above.new_zeros(1, dtype=torch.long), torch.cumsum(above.long(), 0)])
    count = prefix[offsets[1:]] - prefix[offsets[:-1]]
    nd = n.double()
    one = torch.ones_like(n)

    def top_count(ratio: torch.Tensor) -> torch.Tensor:  # clamp(int(r * N), 1, N), int() truncates
        k = torch.trunc(torch.nan_to_num(ratio, nan=0.0) * nd)
        return torch.minimum(torch.maximum(k.clamp(-1, 2 ** 62).long(), one), n)

    is_fixed = ~torch.isnan(fixed)
    capped = ~torch.isnan(max_r) & (count.double() / nd.clamp(min=1) > max_r)
    k_cap = top_count(max_r)
    kept = torch.where(capped, k_cap, count)
    topped = kept < min_n
    k_min = torch.minimum(torch.maximum(min_n, one), n)
    limit = torch.maximum(torch.where(capped, k_cap, 0), torch.where(topped, k_min, 0))
    limit = torch.where(is_fixed, top_count(fixed), limit)
    use_above = ~is_fixed & ~capped
    return x, above, req, use_above, limit


def _segment_ranks(x: torch.Tensor, req: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """int64 [T]: each token's place in its request's (logit descending, index ascending) order,
    sync-free and O(T log T): a stable descending sort of all logits, then a stable sort of that
    order by request (which keeps the logit order inside each request). ``x + 0.0`` turns -0.0
    into +0.0 first, so that the two compare equal (a tie) as in the rule, whatever the sort's
    key transform (radix sorts on CUDA order -0.0 before +0.0)."""
    total = x.shape[0]
    order = torch.sort(x + 0.0, descending=True, stable=True).indices
    order = order[torch.sort(req[order], stable=True).indices]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(total, device=x.device) - offsets[req[order]]
    return ranks


def keep_and_compact_reference(
    scores: torch.Tensor,
    offsets: torch.Tensor,
    *,
    threshold=0.5,
    max_remain_ratio=None,
    min_remain_num=1,
    fixed_remain_ratio=None,
    force_keep: torch.Tensor | None = None,
    trim: bool = True,
) -> KeepResult:
    """Torch reference: a loop over requests, ``keep_rule.keep_mask`` on each, ``nonzero``."""
    batch, total = _check_keep_args(scores, offsets, force_keep)
    bounds = offsets.tolist()
    params = [_per_request(p, batch, torch.float64, "cpu", float("nan")).tolist() for p in
              (threshold, max_remain_ratio, fixed_remain_ratio)]
    mins = _per_request(min_remain_num, batch, torch.int64, "cpu", 0).tolist()
    masks = []
    for b in range(batch):
        thr, max_r, fixed = (p[b] for p in params)
        masks.append(_keep_mask_rule(
            scores[bounds[b]:bounds[b + 1]],
            # Through float32, as the tensor paths hold it; an exact float32 value is compared the same.
            threshold=float(torch.tensor(thr, dtype=torch.float32)),
            max_remain_ratio=None if math.isnan(max_r) else max_r,
            min_remain_num=mins[b] if mins[b] > 0 else None,
            fixed_remain_ratio=None if math.isnan(fixed) else fixed))
    mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=scores.device)
    if force_keep is not None:
        mask = mask | force_keep.to(mask.device)
    return _compact_torch(mask, offsets, total, trim)


def _check_keep_args(scores: torch.Tensor, offsets: torch.Tensor,
                     force_keep: torch.Tensor | None = None) -> tuple[int, int]:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [T], got {tuple(scores.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 1 or offsets.is_floating_point():
        raise ValueError(f"offsets must be an integer [B+1] tensor, got {tuple(offsets.shape)}")
    if force_keep is not None and (force_keep.shape != scores.shape or force_keep.dtype != torch.bool):
        raise ValueError(f"force_keep must be a bool [T={scores.shape[0]}] tensor, got "
                         f"{force_keep.dtype} {tuple(force_keep.shape)}")
    return offsets.shape[0] - 1, scores.shape[0]


def _validate_keep_values(scores: torch.Tensor, offsets: torch.Tensor, total: int) -> None:
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"offsets {bounds} must rise from 0 to {total}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("GlimpsePrune keep rule: the VIP produced NaN logits")


def _compact_torch(mask: torch.Tensor, offsets: torch.Tensor, total: int, trim: bool) -> KeepResult:
    offsets = offsets.long()
    prefix = torch.cat([offsets.new_zeros(1), torch.cumsum(mask.long(), 0)])
    kept_offsets = prefix[offsets]
    kept = torch.nonzero(mask).squeeze(-1)
    local = kept - offsets[_token_requests(offsets, total)[kept]]
    if not trim:
        pad = torch.full((total - kept.shape[0],), -1, dtype=torch.long, device=mask.device)
        kept, local = torch.cat([kept, pad]), torch.cat([local, pad])
    return KeepResult(mask, kept, local, kept_offsets)


def _keep_cpu(scores, offsets, thr, max_r, min_n, fixed, trim, force_keep=None) -> KeepResult:
    """Vectorised torch decisions (:func:`_plan`); then, only for the requests that need a top-k
    (capped, topped up or fixed), one stable descending sort of that request's logits."""
    total = scores.shape[0]
    x, above, req, use_above, limit = _plan(scores, offsets, thr, max_r, min_n, fixed)
    mask = use_above[req] & above
    needs_rank = torch.nonzero(limit > 0).squeeze(-1).tolist()
    if needs_rank:
        bounds, limits = offsets.tolist(), limit.tolist()
        for b in needs_rank:  # ties towards the lower index, as keep_mask
            top = torch.sort(x[bounds[b]:bounds[b + 1]], descending=True, stable=True).indices
            mask[bounds[b] + top[:limits[b]]] = True
    if force_keep is not None:
        mask |= force_keep
    return _compact_torch(mask, offsets, total, trim)


if HAS_TRITON:

    @triton.jit
    def _keep_compact_kernel(
        above_ptr, rank_ptr, force_ptr, req_ptr, offsets_ptr, use_above_ptr, limit_ptr,
        keep_ptr, index_ptr, local_ptr, before_ptr, T,
        HAS_FORCE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Single program, the rule's mask fused with its stream compaction. For each token i of
        request b = req[i]: keep[i] = (use_above[b] & above[i]) | (rank[i] < limit[b]) | force[i];
        then a running prefix sum over blocks: for every kept i, index[slot] = i and
        local[slot] = i - offsets[b] with slot = #kept before i; before[i] = #kept before i for
        i in [0, T] (the launcher gathers kept_offsets = before[offsets] from it)."""
        carried = tl.full([], 0, tl.int64)
        for start in range(0, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < T
            req = tl.load(req_ptr + offs, mask=mask, other=0)
            above = tl.load(above_ptr + offs, mask=mask, other=0) != 0
            use_above = tl.load(use_above_ptr + req, mask=mask, other=0) != 0
            rank = tl.load(rank_ptr + offs, mask=mask, other=0)
            limit = tl.load(limit_ptr + req, mask=mask, other=0)
            keep = (use_above & above) | (rank < limit)
            if HAS_FORCE:
                keep = keep | (tl.load(force_ptr + offs, mask=mask, other=0) != 0)
            keep = keep & mask
            tl.store(keep_ptr + offs, keep.to(tl.int8), mask=mask)
            keep64 = keep.to(tl.int64)
            inclusive = carried + tl.cumsum(keep64, axis=0)
            tl.store(before_ptr + offs, inclusive - keep64, mask=mask)
            first = tl.load(offsets_ptr + req, mask=mask, other=0)
            tl.store(index_ptr + inclusive - 1, offs.to(tl.int64), mask=keep)
            tl.store(local_ptr + inclusive - 1, (offs - first).to(tl.int64), mask=keep)
            carried += tl.sum(keep64, axis=0)
        tl.store(before_ptr + T, carried)


# Whether @triton.jit built interpreted functions (TRITON_INTERPRET=1 when this module was
# imported): those run on CPU tensors; compiled kernels need CUDA tensors.
INTERPRETED = HAS_TRITON and not isinstance(_keep_compact_kernel, triton.runtime.JITFunction)


def keep_and_compact(
    scores: torch.Tensor,
    offsets: torch.Tensor,
    *,
    threshold=0.5,
    max_remain_ratio=None,
    min_remain_num=1,
    fixed_remain_ratio=None,
    force_keep: torch.Tensor | None = None,
    trim: bool = True,
    backend: str = "auto",
    block_compact: int = 1024,
) -> KeepResult:
    """GlimpsePrune's keep rule on every request of a batch, then the kept tokens' indices.

    ``scores [T]``: the VIP's logits (one per image token, requests concatenated), ``offsets
    [B+1]``: request b owns ``scores[offsets[b]:offsets[b+1]]`` (possibly none). The rule
    parameters are scalars (every request) or per request (``[B]`` tensors or sequences; None or,
    in tensors, NaN for an unset ratio and 0 for an unset min_remain_num); their meaning and
    defaults are :func:`vllm_glimpse.glimpse.keep_rule.keep_mask`'s, and each request's mask equals
    ``keep_mask(scores[offsets[b]:offsets[b+1]], ...)`` exactly (ties towards the lower index).
    ``force_keep`` (bool [T], optional) is ORed in last: tokens kept whatever the rule says (the
    authors' anchors; every token of a request whose VIP output is unusable).

    Triton path, nothing waits for the device unless ``trim``: the rule's per-request decisions
    (sigmoid > threshold, counts, the float64 ratio tests, the top-k sizes) are a handful of torch
    ops on [T] and [B] tensors; the ranks for the top-k come from two stable sorts of all T logits
    (O(T log T), not a pairwise count); one Triton kernel applies the rule and prefix-sums the mask
    into the kept indices. Pass per-request parameters as device tensors (scalars are filled on
    the device; Python sequences are copied without blocking). ``trim=True`` reads the kept total
    (one host synchronisation) to cut the index outputs; ``trim=False`` does not.
    """
    batch, total = _check_keep_args(scores, offsets, force_keep)
    path = _resolve(backend, scores, offsets)
    kwargs = dict(threshold=threshold, max_remain_ratio=max_remain_ratio,
                  min_remain_num=min_remain_num, fixed_remain_ratio=fixed_remain_ratio)
    if path == "torch":
        return keep_and_compact_reference(scores, offsets, trim=trim, force_keep=force_keep,
                                          **kwargs)
    params = _rule_params(batch, scores.device, **kwargs)
    if path == "cpu":
        _validate_keep_values(scores, offsets, total)
        return _keep_cpu(scores, offsets, *params, trim, force_keep)
    device = scores.device
    offsets64 = offsets.long().contiguous()
    keep = torch.empty(total, dtype=torch.int8, device=device)
    index = torch.full((total,), -1, dtype=torch.long, device=device)
    local = torch.full((total,), -1, dtype=torch.long, device=device)
    before = torch.zeros(total + 1, dtype=torch.long, device=device)
    if total:
        x, above, req, use_above, limit = _plan(scores, offsets64, *params)
        ranks = _segment_ranks(x, req, offsets64)
        force = keep if force_keep is None else force_keep.view(torch.int8)  # (unread if None)
        _keep_compact_kernel[(1,)](
            above.view(torch.int8), ranks, force, req, offsets64, use_above.view(torch.int8),
            limit, keep, index, local, before, total,
            HAS_FORCE=force_keep is not None, BLOCK=block_compact)
    mask = keep.view(torch.bool)
    kept_offsets = before[offsets64]
    if trim:
        count = int(kept_offsets[-1])  # the one host sync, asked for by trim=True
        index, local = index[:count], local[:count]
    return KeepResult(mask, index, local, kept_offsets)
