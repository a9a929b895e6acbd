"""Triton kernels for VisionZip (arXiv 2412.04467): the importance score, the dominant-token
selection and the contextual merge, each with its pure-torch reference and its CPU path.

Every operation has a launcher taking ``backend=``:

- ``"triton"``: the Triton kernel. CUDA tensors, or CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1`` in the environment before triton is first imported in the process:
  @triton.jit reads it, triton.language's own @jit helpers included; how the tests run the
  kernels on CPU).
- ``"torch"``: the pure-torch reference written next to the kernel (what the tests compare to).
- ``"cpu"``: the production non-Triton path: the C++ op from ``csrc/`` for the segment mean on
  CPU tensors (``vllm_glimpse.visionzip.segment_mean_merge``), the torch reference elsewhere.
- ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton is importable, else ``"cpu"``.

The semantics are those of :mod:`vllm_glimpse.visionzip` (the authors' rules; see that module's
docstring); this module only makes them run on the GPU without host synchronisation and without
materialising the S x S attention matrix. The order in which the kept tokens reach the LLM
(dominant then contextual for LLaVA; raster order of the slots for Qwen,
``vllm_glimpse.visionzip.place_in_raster_order``) is applied after these operations by
``vllm_glimpse.visionzip.visionzip`` on every path, with torch index ops (no host sync either).

Public API::

    attention_received_scores(q, k, scale=None, *, reduce="mean", query_chunk=None, backend="auto")
    attention_received_scores_reference(q, k, scale=None, *, reduce="mean", query_chunk=None)
    topk_keep_mask(scores, k, *, backend="auto")           # bool [n]
    topk_keep_mask_reference(scores, k)
    topk_indices(scores, k, *, backend="auto")             # sorted long [min(k, n)]
    assign_to_targets(member_keys, target_keys, *, backend="auto")        # long [M]
    assign_to_targets_reference(member_keys, target_keys)
    segment_mean_merge(targets, members, assignment, *, backend="auto")   # [C, H]
    contextual_merge(remaining_hidden, remaining_keys, contextual, *, backend="auto")
    contextual_merge_reference(remaining_hidden, remaining_keys, contextual)
    member_positions(num_remaining, contextual, device=None)   # non-target positions, sync-free
    HAS_TRITON, INTERPRETED, BACKENDS

Block sizes are keyword arguments of the launchers (the tests use small ones under the
interpreter). The defaults are reasonable Hopper/Ampere choices, not autotuned.
"""

from __future__ import annotations

import torch

from vllm_glimpse.kernels._backend import resolve_backend
from vllm_glimpse.visionzip import (
    contextual_targets,
    segment_mean_merge_reference,
)
from vllm_glimpse.visionzip import (
    segment_mean_merge as _segment_mean_merge_cpu,
)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton: the torch/C++ paths still work
    triton = None
    tl = None
    HAS_TRITON = False


# Query rows per chunk of the torch score reference are capped so that one chunk's logits
# [H, rows, S] stay under this many float32 elements (256 MiB), and at 1024 rows.
_REFERENCE_CHUNK_ELEMENTS = 1 << 26
_REFERENCE_MAX_CHUNK = 1024


def _resolve(backend: str, *tensors: torch.Tensor) -> str:
    return resolve_backend(backend, tensors, has_triton=HAS_TRITON, interpreted=INTERPRETED)


def _next_pow2(n: int, minimum: int = 16) -> int:
    # tl.dot needs every block dimension >= 16 on the GPU.
    return max(minimum, triton.next_power_of_2(n))


# -------------------------------------------------------------------------------------------------
# 1. Importance score: attention each key receives, summed over queries.
# -------------------------------------------------------------------------------------------------


def attention_received_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    *,
    reduce: str = "mean",
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Torch reference (and CPU path) of :func:`attention_received_scores`.

    Processes the queries in chunks: one chunk's logits are [H, chunk, S], never [H, S_q, S].
    """
    s_q, heads, dim, s = _check_qk(q, k, reduce)
    scale = dim ** -0.5 if scale is None else float(scale)
    if query_chunk is None:
        query_chunk = max(1, min(_REFERENCE_MAX_CHUNK,
                                 _REFERENCE_CHUNK_ELEMENTS // max(1, heads * s)))
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    keys = k.float().transpose(0, 1)  # [H, S, D]
    total = torch.zeros(s, dtype=torch.float32, device=k.device)
    for start in range(0, s_q, query_chunk):
        rows = q[start:start + query_chunk].float().transpose(0, 1)  # [H, c, D]
        logits = torch.matmul(rows, keys.transpose(1, 2)) * scale  # [H, c, S]
        total += torch.softmax(logits, dim=-1).sum(dim=(0, 1))
    return total / heads if reduce == "mean" else total


def _check_qk(q: torch.Tensor, k: torch.Tensor, reduce: str) -> tuple[int, int, int, int]:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [S_q, H, D] and k [S, H, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in heads or head dim")
    if not q.is_floating_point() or q.dtype != k.dtype:
        raise ValueError(f"q and k must share a floating dtype, got {q.dtype}, {k.dtype}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum' over heads, got {reduce!r}")
    return q.shape[0], q.shape[1], q.shape[2], k.shape[0]


if HAS_TRITON:

    @triton.jit
    def _row_logsumexp_kernel(
        q_ptr, k_ptr, lse_ptr, S_Q, S, D, scale,
        stride_qs, stride_qh, stride_qd, stride_ks, stride_kh, stride_kd,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Pass 1, one program per (query block, head): lse[h, i] = logsumexp_j(q_i.k_j*scale),
        an online max / sum-exp over key blocks (flash-attention style), fp32 throughout."""
        pid_q = tl.program_id(0)
        head = tl.program_id(1)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + offs_q[:, None] * stride_qs + head * stride_qh + offs_d[None, :] * stride_qd,
                    mask=(offs_q[:, None] < S_Q) & (offs_d[None, :] < D), other=0.0)
        row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_Q], tl.float32)
        for start in range(0, S, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            k_t = tl.load(k_ptr + offs_k[None, :] * stride_ks + head * stride_kh
                          + offs_d[:, None] * stride_kd,
                          mask=(offs_k[None, :] < S) & (offs_d[:, None] < D), other=0.0)
            logits = tl.dot(q, k_t, input_precision=PRECISION) * scale
            logits = tl.where(offs_k[None, :] < S, logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            # The first block has a valid key (S >= 1), so new_max is finite and exp(-inf) = 0.
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            row_max = new_max
        tl.store(lse_ptr + head * S_Q + offs_q, row_max + tl.log(row_sum), mask=offs_q < S_Q)

    @triton.jit
    def _received_attention_kernel(
        q_ptr, k_ptr, lse_ptr, out_ptr, S_Q, S, D, scale,
        stride_qs, stride_qh, stride_qd, stride_ks, stride_kh, stride_kd,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Pass 2, one program per (key block, head): out[h, j] = sum_i exp(q_i.k_j*scale - lse[h, i]),
        i.e. the column sums of head h's softmax, accumulated over query blocks in fp32."""
        pid_k = tl.program_id(0)
        head = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_d = tl.arange(0, BLOCK_D)
        k_t = tl.load(k_ptr + offs_k[None, :] * stride_ks + head * stride_kh + offs_d[:, None] * stride_kd,
                      mask=(offs_k[None, :] < S) & (offs_d[:, None] < D), other=0.0)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, S_Q, BLOCK_Q):
            offs_q = start + tl.arange(0, BLOCK_Q)
            q = tl.load(q_ptr + offs_q[:, None] * stride_qs + head * stride_qh + offs_d[None, :] * stride_qd,
                        mask=(offs_q[:, None] < S_Q) & (offs_d[None, :] < D), other=0.0)
            lse = tl.load(lse_ptr + head * S_Q + offs_q, mask=offs_q < S_Q, other=float("inf"))
            logits = tl.dot(q, k_t, input_precision=PRECISION) * scale
            prob = tl.exp(logits - lse[:, None])
            prob = tl.where((offs_q[:, None] < S_Q) & (offs_k[None, :] < S), prob, 0.0)
            acc += tl.sum(prob, axis=0)
        tl.store(out_ptr + head * S + offs_k, acc, mask=offs_k < S)


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: full-precision dot ("ieee"), not TF32, so that near-tied scores are ordered
    # as the fp32 torch reference orders them; 16-bit products are exact in fp32 anyway.
    return "ieee" if dtype == torch.float32 else None


def attention_received_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    *,
    reduce: str = "mean",
    query_chunk: int | None = None,
    backend: str = "auto",
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """VisionZip's importance score for one image: the attention each key token receives.

    q [S_q, H, D], k [S, H, D]. Returns [S] float32::

        score[j] = sum_i  reduce_h  softmax_j(q[i, h] . k[j, h] * scale)

    with ``reduce="mean"`` (head mean; Qwen2.5-VL, where S_q == S and the score is what each token
    receives from all queries) or ``reduce="sum"`` (LLaVA, where the single query is the CLS row
    and the authors sum the CLS attention over heads). ``scale`` defaults to D ** -0.5.
    ``query_chunk`` only applies to the torch paths (rows of queries per chunk); the Triton path
    is two-pass flash style: per (query, head) logsumexp over key blocks, then per key block the
    column sums of exp(logit - lse) over query blocks. Neither materialises S_q x S.
    """
    s_q, heads, dim, s = _check_qk(q, k, reduce)
    path = _resolve(backend, q, k)
    if path != "triton":
        return attention_received_scores_reference(q, k, scale, reduce=reduce, query_chunk=query_chunk)
    scale = dim ** -0.5 if scale is None else float(scale)
    if s == 0 or s_q == 0:
        return torch.zeros(s, dtype=torch.float32, device=k.device)
    if dim > 256:
        raise ValueError(f"head dim {dim} > 256 is not supported by the Triton score kernel")
    block_d = _next_pow2(dim)
    block_q = min(block_q, _next_pow2(s_q))  # LLaVA's single CLS row: one 16-row block
    lse = torch.empty(heads, s_q, dtype=torch.float32, device=q.device)
    partial = torch.empty(heads, s, dtype=torch.float32, device=q.device)
    strides = (*q.stride(), *k.stride())
    precision = _dot_precision(q.dtype)
    _row_logsumexp_kernel[(triton.cdiv(s_q, block_q), heads)](
        q, k, lse, s_q, s, dim, scale, *strides,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=precision)
    _received_attention_kernel[(triton.cdiv(s, block_k), heads)](
        q, k, lse, partial, s_q, s, dim, scale, *strides,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=precision)
    # Per-head partial sums, reduced here rather than with atomics: the score feeds a top-k, so
    # it must be the same number on every run.
    total = partial.sum(dim=0)
    return total / heads if reduce == "mean" else total


# -------------------------------------------------------------------------------------------------
# 2. Dominant-token selection: top-k, ties towards the lower index, sorted.
# -------------------------------------------------------------------------------------------------


def topk_keep_mask_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Torch reference (and CPU path): bool [n], True for the k largest scores; ties go to the
    lower index (a stable descending sort lists equal scores in index order), as
    ``vllm_glimpse.visionzip.topk_indices``."""
    n = _check_scores(scores, k)
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    keep[order[:k]] = True
    return keep


def _check_scores(scores: torch.Tensor, k: int) -> int:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return scores.shape[0]


if HAS_TRITON:

    @triton.jit
    def _rank_keep_kernel(s_ptr, keep_ptr, N, K, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        """keep[i] = rank_i < K with rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}: the
        position of i in the (score desc, index asc) order, i.e. the authors' top-k with the
        lower index winning ties. Scores must be NaN-free (NaN compares false both ways)."""
        offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        s_i = tl.load(s_ptr + offs_i, mask=offs_i < N, other=0.0)
        rank = tl.zeros([BLOCK_I], tl.int32)
        for start in range(0, N, BLOCK_J):
            offs_j = start + tl.arange(0, BLOCK_J)
            s_j = tl.load(s_ptr + offs_j, mask=offs_j < N, other=0.0)
            higher = s_j[None, :] > s_i[:, None]
            tied_before = (s_j[None, :] == s_i[:, None]) & (offs_j[None, :] < offs_i[:, None])
            ahead = (higher | tied_before) & (offs_j[None, :] < N)
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        tl.store(keep_ptr + offs_i, (rank < K).to(tl.int8), mask=offs_i < N)

    @triton.jit
    def _compact_kernel(keep_ptr, out_ptr, N, BLOCK: tl.constexpr):
        """out[#kept before i] = i for every kept i: a single-program prefix sum over blocks,
        so the indices come out sorted and the launcher needs no host sync (len(out) is known)."""
        carried = 0
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            keep = tl.load(keep_ptr + offs, mask=offs < N, other=0).to(tl.int32)
            slot = carried + tl.cumsum(keep, axis=0) - 1
            tl.store(out_ptr + slot, offs.to(tl.int64), mask=(keep != 0) & (offs < N))
            carried += tl.sum(keep, axis=0)


def topk_keep_mask(
    scores: torch.Tensor, k: int, *, backend: str = "auto", block_i: int = 64, block_j: int = 256
) -> torch.Tensor:
    """bool [n]: True for the k largest scores (ties to the lower index; all when k >= n)."""
    n = _check_scores(scores, k)
    if _resolve(backend, scores) != "triton":
        return topk_keep_mask_reference(scores, k)
    # Compare in float32 like the reference (a float64 input may tie after the cast).
    values = scores.float().contiguous()
    keep = torch.empty(n, dtype=torch.int8, device=scores.device)
    if n:
        _rank_keep_kernel[(triton.cdiv(n, block_i),)](values, keep, n, min(k, n),
                                                      BLOCK_I=block_i, BLOCK_J=block_j)
    return keep.view(torch.bool)


def topk_indices(
    scores: torch.Tensor, k: int, *, backend: str = "auto", block_i: int = 64, block_j: int = 256,
    block_compact: int = 1024,
) -> torch.Tensor:
    """long [min(k, n)]: the indices of the k largest scores, sorted ascending; equal to
    ``vllm_glimpse.visionzip.topk_indices``."""
    n = _check_scores(scores, k)
    kept = min(k, n)
    path = _resolve(backend, scores)
    if path != "triton":
        return torch.nonzero(topk_keep_mask_reference(scores, k)).squeeze(-1)
    out = torch.empty(kept, dtype=torch.long, device=scores.device)
    if kept:
        keep = topk_keep_mask(scores, k, backend="triton", block_i=block_i, block_j=block_j)
        _compact_kernel[(1,)](keep.view(torch.int8), out, n, BLOCK=block_compact)
    return out


# -------------------------------------------------------------------------------------------------
# 3. Contextual merge: cosine assignment to uniformly strided targets, then segment mean.
# -------------------------------------------------------------------------------------------------


def _normalise(keys: torch.Tensor) -> torch.Tensor:
    # Exactly the reference's expression (a zero key gives NaN there too), computed in torch on
    # every path so the kernels see bit-identical unit keys and only the dot order can differ.
    keys = keys.float()
    return keys / keys.norm(dim=-1, keepdim=True)


def member_positions(num_remaining: int, contextual: int, device=None) -> torch.Tensor:
    """Positions (within the R remaining tokens) of the non-target tokens, in raster order.

    Closed form of ``nonzero(~is_target)`` without a host sync: targets sit at t * step for
    t < C' (C' = min(C, R) targets, step = max(1, R // C)), so each of the first C' stride blocks
    holds one target then step - 1 members, and everything from C' * step on is a member
    (C' * step <= R always: step <= R / C when C <= R, and step = 1, C' = R otherwise).
    """
    if contextual == 0 or num_remaining == 0:
        return torch.arange(num_remaining, device=device)
    step = max(1, num_remaining // contextual)
    num_targets = min(contextual, num_remaining)  # C <= R: ceil(R / step) >= C stride positions
    m = torch.arange(num_remaining - num_targets, device=device)
    if step == 1:
        return m + num_targets
    in_blocks = num_targets * (step - 1)
    strided = (m // (step - 1)) * step + 1 + m % (step - 1)
    return torch.where(m < in_blocks, strided, m - in_blocks + num_targets * step)


def assign_to_targets_reference(member_keys: torch.Tensor, target_keys: torch.Tensor) -> torch.Tensor:
    """long [M]: for each member, the target of highest cosine similarity (first on ties)."""
    return (_normalise(member_keys) @ _normalise(target_keys).T).argmax(dim=-1)


if HAS_TRITON:

    @triton.jit
    def _cosine_argmax_kernel(
        normed_ptr, member_rows_ptr, target_rows_ptr, assign_ptr, M, C, DK,
        stride_r, stride_d,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """assign[m] = argmax_t <key[member m], key[target t]> over unit keys, first t on ties.

        Running max over target blocks: a later block replaces the best only when strictly
        greater, and within a block tl.argmax breaks ties left, so the first maximum wins (like
        torch.argmax). NaN similarities (a zero key normalises to NaN, as in the reference) rank
        above everything, again like torch.argmax, by mapping them to +inf (cosines are finite).
        """
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        rows = tl.load(member_rows_ptr + offs_m, mask=m_mask, other=0)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_index = tl.zeros([BLOCK_M], tl.int64)
        for t_start in range(0, C, BLOCK_T):
            offs_t = t_start + tl.arange(0, BLOCK_T)
            t_mask = offs_t < C
            t_rows = tl.load(target_rows_ptr + offs_t, mask=t_mask, other=0)
            sim = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
            for d_start in range(0, DK, BLOCK_D):
                offs_d = d_start + tl.arange(0, BLOCK_D)
                d_mask = offs_d < DK
                a = tl.load(normed_ptr + rows[:, None] * stride_r + offs_d[None, :] * stride_d,
                            mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                b = tl.load(normed_ptr + t_rows[None, :] * stride_r + offs_d[:, None] * stride_d,
                            mask=t_mask[None, :] & d_mask[:, None], other=0.0)
                sim += tl.dot(a, b, input_precision=PRECISION)
            sim = tl.where(sim != sim, float("inf"), sim)
            sim = tl.where(t_mask[None, :], sim, float("-inf"))
            block_best = tl.max(sim, axis=1)
            block_index = tl.argmax(sim, axis=1, tie_break_left=True).to(tl.int64) + t_start
            better = block_best > best
            best = tl.where(better, block_best, best)
            best_index = tl.where(better, block_index, best_index)
        tl.store(assign_ptr + offs_m, best_index, mask=m_mask)

    @triton.jit
    def _segment_mean_kernel(
        target_ptr, target_rows_ptr, member_ptr, member_rows_ptr, offsets_ptr, out_ptr, H,
        stride_tr, stride_th, stride_mr, stride_mh, stride_or, stride_oh,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """One program per (target c, hidden block): out[c] = target[c] + mean of its members.

        The members are pre-sorted by target (stable), so target c owns the contiguous slice
        member_rows[offsets[c]:offsets[c + 1]]: a deterministic fp32 sum, no atomics. A target
        without members gets target + 0 / 1, i.e. stays as is (the authors' rule).
        """
        c = tl.program_id(0)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        start = tl.load(offsets_ptr + c)
        end = tl.load(offsets_ptr + c + 1)
        acc = tl.zeros([BLOCK_H], tl.float32)
        for m_start in range(start, end, BLOCK_M):
            offs = m_start + tl.arange(0, BLOCK_M)
            rows = tl.load(member_rows_ptr + offs, mask=offs < end, other=0)
            x = tl.load(member_ptr + rows[:, None] * stride_mr + offs_h[None, :] * stride_mh,
                        mask=(offs[:, None] < end) & h_mask[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32), axis=0)
        count = tl.maximum((end - start).to(tl.float32), 1.0)
        t_row = tl.load(target_rows_ptr + c)
        target = tl.load(target_ptr + t_row * stride_tr + offs_h * stride_th, mask=h_mask, other=0.0)
        merged = target.to(tl.float32) + acc / count
        tl.store(out_ptr + c * stride_or + offs_h * stride_oh, merged.to(out_ptr.dtype.element_ty),
                 mask=h_mask)


# Whether @triton.jit built interpreted functions (TRITON_INTERPRET=1 when this module was
# imported): those run on CPU tensors; compiled kernels need CUDA tensors.
INTERPRETED = HAS_TRITON and not isinstance(_rank_keep_kernel, triton.runtime.JITFunction)


def _launch_assign(normed: torch.Tensor, member_rows: torch.Tensor, target_rows: torch.Tensor,
                   block_m: int, block_t: int, block_d: int) -> torch.Tensor:
    num_members, num_targets = member_rows.numel(), target_rows.numel()
    assignment = torch.zeros(num_members, dtype=torch.long, device=normed.device)
    if num_members and num_targets:
        _cosine_argmax_kernel[(triton.cdiv(num_members, block_m),)](
            normed, member_rows, target_rows, assignment, num_members, num_targets, normed.shape[1],
            *normed.stride(), BLOCK_M=block_m, BLOCK_T=block_t,
            BLOCK_D=min(block_d, _next_pow2(normed.shape[1])), PRECISION="ieee")
    return assignment


def _launch_segment_mean(target_src: torch.Tensor, target_rows: torch.Tensor,
                         member_src: torch.Tensor, member_rows: torch.Tensor,
                         assignment: torch.Tensor, block_m: int, block_h: int) -> torch.Tensor:
    num_targets, hidden = target_rows.numel(), target_src.shape[1]
    out = torch.empty(num_targets, hidden, dtype=target_src.dtype, device=target_src.device)
    if num_targets == 0 or hidden == 0:
        return out
    # Stable sort by target, then each target's slice by binary search: no host sync (bincount
    # would need the max on the host). Assignments outside [0, C) fall outside every slice.
    sorted_assignment, order = torch.sort(assignment, stable=True)
    offsets = torch.searchsorted(sorted_assignment,
                                 torch.arange(num_targets + 1, device=assignment.device,
                                              dtype=sorted_assignment.dtype))
    rows = member_rows[order]
    _segment_mean_kernel[(num_targets, triton.cdiv(hidden, block_h))](
        target_src, target_rows, member_src, rows, offsets, out, hidden,
        *target_src.stride(), *member_src.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_H=block_h)
    return out


def assign_to_targets(
    member_keys: torch.Tensor, target_keys: torch.Tensor, *, backend: str = "auto",
    block_m: int = 64, block_t: int = 64, block_d: int = 64,
) -> torch.Tensor:
    """long [M]: each member's most cosine-similar target (first on ties); keys are not yet
    normalised. member_keys [M, Dk], target_keys [C, Dk], C >= 1 unless M == 0."""
    if member_keys.dim() != 2 or target_keys.dim() != 2 or member_keys.shape[1] != target_keys.shape[1]:
        raise ValueError(f"keys must be [M, Dk] and [C, Dk], got {tuple(member_keys.shape)}, "
                         f"{tuple(target_keys.shape)}")
    if member_keys.shape[0] and not target_keys.shape[0]:
        raise ValueError("members need at least one target")
    if _resolve(backend, member_keys, target_keys) != "triton":
        return assign_to_targets_reference(member_keys, target_keys)
    normed = _normalise(torch.cat([target_keys, member_keys]))
    device = normed.device
    num_targets = target_keys.shape[0]
    return _launch_assign(normed, torch.arange(num_targets, normed.shape[0], device=device),
                          torch.arange(num_targets, device=device), block_m, block_t, block_d)


def segment_mean_merge(
    targets: torch.Tensor, members: torch.Tensor, assignment: torch.Tensor, *,
    backend: str = "auto", block_m: int = 32, block_h: int = 128,
) -> torch.Tensor:
    """targets [C, H] + per-target mean of members [M, H] assigned by assignment [M] (values in
    [0, C); the Triton path does not check that, it would need a host sync)."""
    if targets.dim() != 2 or members.dim() != 2 or targets.shape[1] != members.shape[1]:
        raise ValueError(f"targets must be [C, H] and members [M, H], got {tuple(targets.shape)}, "
                         f"{tuple(members.shape)}")
    if assignment.shape != (members.shape[0],):
        raise ValueError(f"assignment must be [{members.shape[0]}], got {tuple(assignment.shape)}")
    path = _resolve(backend, targets, members, assignment)
    if path == "torch":
        return segment_mean_merge_reference(targets, members, assignment)
    if path == "cpu":
        return _segment_mean_merge_cpu(targets, members, assignment)
    device = targets.device
    return _launch_segment_mean(targets, torch.arange(targets.shape[0], device=device), members,
                                torch.arange(members.shape[0], device=device), assignment,
                                block_m, block_h)


def contextual_merge_reference(
    remaining_hidden: torch.Tensor, remaining_keys: torch.Tensor, contextual: int,
    *, segment_merge=segment_mean_merge_reference,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`contextual_merge` (the engine's rule, written out with boolean
    masks); ``segment_merge`` is swapped for the C++ op on the CPU path."""
    num_remaining = remaining_hidden.shape[0]
    targets = contextual_targets(num_remaining, contextual, remaining_hidden.device)
    if targets.numel() == 0:
        return remaining_hidden.new_zeros(0, remaining_hidden.shape[1]), targets, targets
    is_target = torch.zeros(num_remaining, dtype=torch.bool, device=remaining_hidden.device)
    is_target[targets] = True
    assignment = assign_to_targets_reference(remaining_keys[~is_target], remaining_keys[targets])
    merged = segment_merge(remaining_hidden[targets], remaining_hidden[~is_target], assignment)
    return merged, targets, assignment


def contextual_merge(
    remaining_hidden: torch.Tensor, remaining_keys: torch.Tensor, contextual: int, *,
    backend: str = "auto", block_m: int = 64, block_t: int = 64, block_d: int = 64,
    block_merge_m: int = 32, block_h: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merge of the R remaining tokens into C tokens, exactly
    ``vllm_glimpse.visionzip.merge_contextual``.

    remaining_hidden [R, H], remaining_keys [R, Dk] (not normalised). Returns (merged [C', H],
    target positions [C'] within the R tokens, assignment [R - C'] target slot of each
    non-target in raster order), C' = min(C, R); all three empty when C' == 0.
    """
    if remaining_hidden.dim() != 2 or remaining_keys.dim() != 2 \
            or remaining_hidden.shape[0] != remaining_keys.shape[0]:
        raise ValueError(f"hidden must be [R, H] and keys [R, Dk], got {tuple(remaining_hidden.shape)}, "
                         f"{tuple(remaining_keys.shape)}")
    if contextual < 0:
        raise ValueError(f"contextual must be >= 0, got {contextual}")
    path = _resolve(backend, remaining_hidden, remaining_keys)
    if path == "torch":
        return contextual_merge_reference(remaining_hidden, remaining_keys, contextual)
    if path == "cpu":
        return contextual_merge_reference(remaining_hidden, remaining_keys, contextual,
                                          segment_merge=_segment_mean_merge_cpu)
    device = remaining_hidden.device
    num_remaining = remaining_hidden.shape[0]
    targets = contextual_targets(num_remaining, contextual, device)
    if targets.numel() == 0:
        return remaining_hidden.new_zeros(0, remaining_hidden.shape[1]), targets, targets
    members = member_positions(num_remaining, contextual, device)
    assignment = _launch_assign(_normalise(remaining_keys), members, targets, block_m, block_t, block_d)
    merged = _launch_segment_mean(remaining_hidden, targets, remaining_hidden, members, assignment,
                                  block_merge_m, block_h)
    return merged, targets, assignment
