"""Kernel microbenchmark: each launcher of kernels/ against its torch reference, realistic shapes.

    .venv/bin/python benchmarks/kernels_bench.py [--quick] [--device cpu|cuda] [--json OUT]
        [--repeats N] [--warmup W] [--peak-gbps GBPS] [--threads T] [--only KERNEL[,KERNEL...]]

What runs against what:

* ``--device cuda`` (the default when CUDA is available): the launcher with ``backend="triton"``
  (the compiled Triton kernels) against the ``*_reference`` torch function, both on the same CUDA
  tensors.
* ``--device cpu``: the launcher with ``backend="cpu"`` (the production CPU path) against the
  reference. For some launchers the CPU path *is* the reference (``= ref`` in the table); the
  rows are still there so that every kernel has its CPU number. Triton never runs on CPU here:
  its interpreter is for tests, not timing.

Every case first runs both paths once and checks the outputs (equal, or allclose for float
scores); a mismatch raises and the script exits non-zero. Then per path: ``--warmup`` calls, then
``--repeats`` timed calls, reported as median and min-max. On CUDA each call is timed with CUDA
events, the L2 cache flushed (a 256 MiB buffer zeroed) before each call so that small inputs are
not served from L2; on CPU with ``time.perf_counter``.

Bandwidth is the bytes a kernel must at least read and write (each input element once, each
output element once; the formula sits next to each case) divided by the median time, in decimal
GB/s. On CUDA it is also given as a percentage of the device's peak DRAM bandwidth (table below,
or ``--peak-gbps``). The score kernel and the top-k rank kernel are compute-bound (quadratic in the
token count), so their % of peak bandwidth is low by nature; the score rows also report TFLOP/s.

Shapes: Qwen2.5-VL-7B (LLM 28 query heads, 4 KV heads, head_dim 128; ViT 16 heads, head_dim 80,
2x2 patch merge, so an image of N LLM tokens has 4N ViT patches; merger output 3584), 1k-16k
image tokens per image, GlimpsePrune's KV move over layers 0..K with K = 18 (19 layers);
LLaVA-1.5-7B (CLIP-L/336: 16 heads, head_dim 64, 577 tokens, hidden 1024; LLM 32 heads = KV
heads, head_dim 128). ``--quick`` runs small shapes (well under a minute on a 2-core CPU); the
default full mode runs the realistic range (minutes on a GPU; on CPU the 16k- and 64k-patch score
cases are skipped, listed as such: their reference alone takes minutes per call there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from vllm_glimpse.kernels import glimpse_triton as glimpse_kernels
from vllm_glimpse.kernels import kv_compaction_triton as kv_kernels
from vllm_glimpse.kernels import visionzip_triton as vz_kernels
from vllm_glimpse.settings import VisionZipSettings, visionzip_counts

KERNELS = (
    "attention_received_scores",
    "topk_keep_mask",
    "topk_indices",
    "contextual_merge",
    "glimpse_attention_logits",
    "keep_and_compact",
    "scatter_kv_to_slots",
)

# Peak DRAM bandwidth in decimal GB/s, from NVIDIA's datasheets:
#   "NVIDIA H100 Tensor Core GPU" datasheet: H100 SXM 3.35 TB/s, H100 PCIe 2 TB/s, H100 NVL 3.9 TB/s.
#   "NVIDIA H200 Tensor Core GPU" datasheet: H200 SXM and H200 NVL 4.8 TB/s.
#   "NVIDIA A100 Tensor Core GPU" datasheet: A100 80GB PCIe 1,935 GB/s, A100 80GB SXM 2,039 GB/s,
#   A100 40GB (PCIe and SXM) 1,555 GB/s.
# Matched against torch.cuda.get_device_name() (case-insensitive), first match wins: every
# substring of the second field present, none of the third. The H100 SXM5 reports itself as
# "NVIDIA H100 80GB HBM3" (no "SXM"), hence the bare "H100" after the PCIe and NVL entries;
# "GH200" (Grace Hopper, other memory configurations) contains "H200" and is excluded.
PEAK_BANDWIDTH_GBPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], float], ...] = (
    ("H100 PCIe", ("H100", "PCIE"), (), 2000.0),
    ("H100 NVL", ("H100", "NVL"), (), 3900.0),
    ("H100 SXM", ("H100",), (), 3350.0),
    ("H200", ("H200",), ("GH200",), 4800.0),
    ("A100 80GB PCIe", ("A100", "80GB", "PCIE"), (), 1935.0),
    ("A100 80GB SXM", ("A100", "80GB"), (), 2039.0),
    ("A100 40GB", ("A100", "40GB"), (), 1555.0),
)

L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of every GPU in the table (50-60 MB)


# -------------------------------------------------------------------------------------------------
# Cases
# -------------------------------------------------------------------------------------------------


class KernelMismatch(AssertionError):
    """The fast path's output differs from the reference's."""


@dataclass
class Case:
    kernel: str
    model: str
    shape: dict[str, Any]
    dtype: str
    fast: Callable[[], Any]
    reference: Callable[[], Any]
    # check(fast_output, reference_output) raises KernelMismatch, returns how it compared.
    check: Callable[[Any, Any], str]
    # bytes_moved(reference_output): the minimum bytes read + written (see each case).
    bytes_moved: Callable[[Any], int]
    cpu_path_is_reference: bool = False
    min_flops: int | None = None  # for compute-bound kernels: the FLOPs any implementation needs
    note: str = ""


def _elem(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _shape_text(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _fail(case_name: str, message: str) -> KernelMismatch:
    return KernelMismatch(f"{case_name}: fast path differs from the reference: {message}")


def _assert_equal(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise _fail(what, f"{got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}")
    if not torch.equal(got, want):
        wrong = (got != want).reshape(-1).nonzero()
        raise _fail(what, f"{wrong.numel()} of {want.numel()} elements differ, first at flat index "
                          f"{int(wrong[0])}")


def _assert_close(what: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise _fail(what, str(exc)) from None


# --- 1. VisionZip importance score ----------------------------------------------------------------


def attention_scores_case(device, backend, *, model, s_q, s, heads, head_dim, reduce, dtype, seed=0):
    """attention_received_scores(q [S_q, H, D], k [S, H, D]) -> float32 [S]."""
    gen = _generator(device, seed)
    # Spread-out logits (x2) so that the softmax is far from uniform, as in the tests.
    q = (2 * torch.randn(s_q, heads, head_dim, generator=gen, device=device)).to(dtype)
    k = torch.randn(s, heads, head_dim, generator=gen, device=device).to(dtype)
    name = f"attention_received_scores[{model}]"

    def check(got, want):
        # fp32 logits, exp and sums on both paths, in another order and with another exp: the
        # relative error of each probability stays near 1e-5, far inside rtol.
        _assert_close(name, got, want, rtol=1e-3, atol=1e-6)
        return "allclose rtol=1e-3"

    # Bytes: read q (S_q*H*D) and k (S*H*D) at the input dtype once, write S float32 scores.
    # FLOPs: at least one q.k^T, 2*S_q*S*H*D (the Triton path computes it twice: lse, then sums).
    return Case(
        kernel="attention_received_scores", model=model,
        shape=dict(S_q=s_q, S=s, H=heads, D=head_dim, reduce=reduce), dtype=_dtype_name(dtype),
        fast=partial(vz_kernels.attention_received_scores, q, k, reduce=reduce, backend=backend),
        reference=partial(vz_kernels.attention_received_scores_reference, q, k, reduce=reduce),
        check=check,
        bytes_moved=lambda _: (s_q + s) * heads * head_dim * _elem(dtype) + s * 4,
        cpu_path_is_reference=True, min_flops=2 * s_q * s * heads * head_dim,
        note="compute-bound: O(S_q*S*H*D)")


# --- 2. VisionZip dominant-token top-k ------------------------------------------------------------


def _equal_check(label):
    """A case's check: the fast path's tensor equals the reference's exactly."""
    def check(got, want):
        _assert_equal(label, got, want)
        return "equal"
    return check


def _token_scores(device, n, seed):
    # Merged per-token scores as the Qwen path produces them: positive float32, distinct.
    return torch.rand(n, generator=_generator(device, seed), device=device)


def topk_keep_mask_case(device, backend, *, model, n, k, seed=0):
    """topk_keep_mask(scores [n], k) -> bool [n]."""
    scores = _token_scores(device, n, seed)

    # Bytes: read n float32 scores, write the n-byte bool mask.
    return Case(
        kernel="topk_keep_mask", model=model, shape=dict(n=n, k=k), dtype="float32",
        fast=partial(vz_kernels.topk_keep_mask, scores, k, backend=backend),
        reference=partial(vz_kernels.topk_keep_mask_reference, scores, k),
        check=_equal_check(f"topk_keep_mask[{model}]"), bytes_moved=lambda _: n * 4 + n,
        cpu_path_is_reference=True, note="Triton path compute-bound: O(n^2) rank comparisons")


def _topk_indices_reference(scores, k):
    return torch.nonzero(vz_kernels.topk_keep_mask_reference(scores, k)).squeeze(-1)


def topk_indices_case(device, backend, *, model, n, k, seed=0):
    """topk_indices(scores [n], k) -> sorted long [min(k, n)]."""
    scores = _token_scores(device, n, seed)

    # Bytes: read n float32 scores, write min(k, n) int64 indices.
    return Case(
        kernel="topk_indices", model=model, shape=dict(n=n, k=k), dtype="float32",
        fast=partial(vz_kernels.topk_indices, scores, k, backend=backend),
        reference=partial(_topk_indices_reference, scores, k),
        check=_equal_check(f"topk_indices[{model}]"), bytes_moved=lambda _: n * 4 + min(k, n) * 8,
        cpu_path_is_reference=True, note="Triton path compute-bound: O(n^2) rank comparisons")


# --- 3. VisionZip contextual merge ----------------------------------------------------------------


def contextual_merge_case(device, backend, *, model, remaining, contextual, hidden, key_dim,
                          dtype, key_dtype, seed=0):
    """contextual_merge(hidden [R, H], keys [R, Dk], C) -> (merged [C, H], targets [C],
    assignment [R - C])."""
    gen = _generator(device, seed)
    hidden_states = torch.randn(remaining, hidden, generator=gen, device=device).to(dtype)
    keys = torch.randn(remaining, key_dim, generator=gen, device=device).to(key_dtype)
    name = f"contextual_merge[{model}]"

    def check(got, want):
        merged, targets, assignment = got
        want_merged, want_targets, want_assignment = want
        _assert_equal(name + " targets", targets, want_targets)
        flips = _near_tie_flips(name, keys, targets, assignment, want_assignment)
        if flips:  # the reference merge under the fast path's (equally valid) assignment
            members = vz_kernels.member_positions(remaining, contextual, device)
            want_merged = vz_kernels.segment_mean_merge_reference(
                hidden_states[targets], hidden_states[members], assignment)
        # Same fp32 sums in another order, then one rounding to the hidden dtype.
        _assert_close(name + " merged", merged, want_merged, rtol=1.6e-2, atol=1e-2)
        if flips:
            return f"assignment equal but for {flips} near-tie flips, merged allclose"
        return "assignment equal, merged allclose"

    def bytes_moved(out):
        c = out[1].numel()
        # Read every remaining hidden row (targets and members) and key once; write the C merged
        # rows, the C target positions and the R - C assignments (int64).
        return (remaining * hidden * _elem(dtype) + remaining * key_dim * _elem(key_dtype)
                + c * hidden * _elem(dtype) + c * 8 + (remaining - c) * 8)

    return Case(
        kernel="contextual_merge", model=model,
        shape=dict(R=remaining, C=contextual, H=hidden, Dk=key_dim), dtype=_dtype_name(dtype),
        fast=partial(vz_kernels.contextual_merge, hidden_states, keys, contextual, backend=backend),
        reference=partial(vz_kernels.contextual_merge_reference, hidden_states, keys, contextual),
        check=check, bytes_moved=bytes_moved,
        note="keys " + _dtype_name(key_dtype) + "; CPU path: C++ segment mean")


def _near_tie_flips(name, keys, targets, got, want) -> int:
    """Members whose target differs between the paths; each must be a near tie in cosine (the
    dot products summed in another order), else KernelMismatch. Returns their count."""
    if got.shape != want.shape:
        raise _fail(name, f"assignment shape {tuple(got.shape)} vs {tuple(want.shape)}")
    differ = (got != want).nonzero().squeeze(-1)
    if differ.numel() == 0:
        return 0
    normed = keys.double() / keys.double().norm(dim=-1, keepdim=True)
    members = vz_kernels.member_positions(keys.shape[0], targets.numel(), keys.device)[differ]
    gap = ((normed[members] * normed[targets[got[differ]]]).sum(-1)
           - (normed[members] * normed[targets[want[differ]]]).sum(-1)).abs()
    if float(gap.max()) > 1e-5:
        raise _fail(name, f"{differ.numel()} assignments differ, cosine gap up to "
                          f"{float(gap.max()):.3g}")
    return differ.numel()


# --- 4. GlimpsePrune attention logits from the paged cache ----------------------------------------


@dataclass
class PagedBatch:
    glimpse_q: torch.Tensor
    key_cache: torch.Tensor
    block_table: torch.Tensor
    image_positions: torch.Tensor
    image_offsets: torch.Tensor
    seq_lens: torch.Tensor


def _paged_batch(device, *, requests, image_tokens, text_before, text_after, heads, kv_heads,
                 head_dim, block_size, dtype, seed) -> PagedBatch:
    """A batch in vLLM 0.32's FlashAttention layout: cache [blocks, kv_heads, block_size, 2*D],
    the key half viewed as [blocks, block_size, kv_heads, D] (strided); each request's pages
    scattered over the cache; one image per request after ``text_before`` tokens."""
    gen = _generator(device, seed)
    seq_len = text_before + image_tokens + text_after
    pages = math.ceil(seq_len / block_size)
    num_blocks = requests * pages + 8  # a few pages nobody owns
    cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim, generator=gen,
                        device=device).to(dtype)
    key_cache = cache.transpose(1, 2).split(head_dim, dim=-1)[0]
    order = torch.randperm(num_blocks, generator=gen, device=device)[:requests * pages]
    block_table = order.view(requests, pages).to(torch.int32)
    positions = torch.arange(text_before, text_before + image_tokens, device=device)
    return PagedBatch(
        glimpse_q=torch.randn(requests, heads, head_dim, generator=gen, device=device).to(dtype),
        key_cache=key_cache, block_table=block_table,
        image_positions=positions.repeat(requests),
        image_offsets=torch.arange(requests + 1, device=device) * image_tokens,
        seq_lens=torch.full((requests,), seq_len, device=device))


def glimpse_logits_case(device, backend, *, model, requests, image_tokens, text_before, text_after,
                        heads, kv_heads, head_dim, log_softmax, dtype, block_size=16, seed=0):
    """glimpse_attention_logits(q [B, H, D], paged keys, ...) -> float32 [T, H]."""
    batch = _paged_batch(device, requests=requests, image_tokens=image_tokens,
                         text_before=text_before, text_after=text_after, heads=heads,
                         kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
                         seed=seed)
    args = (batch.glimpse_q, batch.key_cache, batch.block_table, batch.image_positions,
            batch.image_offsets)
    seq_lens = batch.seq_lens if log_softmax else None
    total = requests * image_tokens
    seq_len = text_before + image_tokens + text_after
    name = f"glimpse_attention_logits[{model}]"

    def check(got, want):
        _assert_close(name, got, want, rtol=1e-4, atol=1e-4)
        return "allclose rtol=1e-4"

    # Bytes: read the B glimpse queries (B*H*D), the keys each row needs once (the T image keys
    # (T*KVH*D); with log_softmax every key of every sequence instead (B*seq_len*KVH*D), the
    # image keys among them), the T int64 positions, B+1 int64 offsets, the int32 block table
    # (and B int64 seq_lens); write T*H float32 logits.
    keys_read = requests * seq_len if log_softmax else total
    table_bytes = (batch.block_table.numel() * 4 + (requests + 1) * 8
                   + (requests * 8 if log_softmax else 0))
    return Case(
        kernel="glimpse_attention_logits", model=model,
        shape=dict(B=requests, T=total, seq=seq_len, H=heads, KVH=kv_heads, D=head_dim,
                   log_softmax=log_softmax),
        dtype=_dtype_name(dtype),
        fast=partial(glimpse_kernels.glimpse_attention_logits, *args, seq_lens=seq_lens,
                     backend=backend),
        reference=partial(glimpse_kernels.glimpse_attention_logits_reference, *args,
                          seq_lens=seq_lens),
        check=check,
        bytes_moved=lambda _: ((requests * heads + keys_read * kv_heads) * head_dim * _elem(dtype)
                               + total * 8 + table_bytes + total * heads * 4),
        note="block_size 16, FlashAttention cache view; reference gathers key by key")


# --- 5. GlimpsePrune keep rule + compaction -------------------------------------------------------


def keep_and_compact_case(device, backend, *, model, requests, image_tokens, rule, seed=0):
    """keep_and_compact(scores [T], offsets [B+1], **rule) -> KeepResult."""
    gen = _generator(device, seed)
    total = requests * image_tokens
    # VIP logits: sigmoid > 0.5 for about a third of the tokens.
    scores = 2 * torch.randn(total, generator=gen, device=device) - 1
    offsets = torch.arange(requests + 1, device=device) * image_tokens
    name = f"keep_and_compact[{model}]"

    def check(got, want):
        for field_name in ("keep_mask", "kept_index", "kept_local", "kept_offsets"):
            _assert_equal(f"{name} {field_name}", getattr(got, field_name), getattr(want, field_name))
        return "equal"

    def bytes_moved(out):
        kept = out.kept_index.numel()
        # Read T float32 scores and B+1 int64 offsets; write the T-byte mask, kept int64 flat and
        # local indices, and B+1 int64 kept offsets.
        return total * 4 + (requests + 1) * 8 + total + kept * 16 + (requests + 1) * 8

    return Case(
        kernel="keep_and_compact", model=model,
        shape=dict(B=requests, T=total, **rule), dtype="float32",
        fast=partial(glimpse_kernels.keep_and_compact, scores, offsets, backend=backend, **rule),
        reference=partial(glimpse_kernels.keep_and_compact_reference, scores, offsets, **rule),
        check=check, bytes_moved=bytes_moved,
        note="trim=True (one host sync); reference loops over requests")


# --- 6. GlimpsePrune KV move ----------------------------------------------------------------------


def scatter_kv_case(device, backend, *, model, layers, tokens, kv_heads, head_dim, dtype,
                    block_size=16, seed=0):
    """scatter_kv_to_slots(key, value [n, KVH, D], caches, slots [n]) once per layer 0..K."""
    gen = _generator(device, seed)
    pages = math.ceil(tokens / block_size)
    num_blocks = 2 * pages  # the request's old pages plus as many others
    # The survivors' compacted slots: the first n slots of the request's pages, pages scattered.
    blocks = torch.randperm(num_blocks, generator=gen, device=device)[:pages]
    rows = torch.arange(tokens, device=device)
    slots = blocks[rows // block_size] * block_size + rows % block_size
    keys = [torch.randn(tokens, kv_heads, head_dim, generator=gen, device=device).to(dtype)
            for _ in range(layers)]
    values = [torch.randn(tokens, kv_heads, head_dim, generator=gen, device=device).to(dtype)
              for _ in range(layers)]
    caches = [torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim, generator=gen,
                          device=device).to(dtype) for _ in range(layers)]
    fast_caches = [c.clone() for c in caches]
    ref_caches = caches

    def views(cache):  # vLLM 0.32 FlashAttention: [blocks, block_size, kv_heads, D] strided views
        return cache.transpose(1, 2).split(head_dim, dim=-1)

    def move(scatter, target_caches, **kwargs):
        for key, value, cache in zip(keys, values, target_caches):
            scatter(key, value, *views(cache), slots, **kwargs)
        return target_caches

    def check(got, want):
        for layer, (g, w) in enumerate(zip(got, want)):
            _assert_equal(f"scatter_kv_to_slots[{model}] layer {layer}", g, w)
        return "equal"

    # Bytes per layer: read key and value (2*n*KVH*D) and n int64 slots, write 2*n*KVH*D cache
    # elements; times the number of layers.
    per_layer = 2 * tokens * kv_heads * head_dim * _elem(dtype) * 2 + tokens * 8
    return Case(
        kernel="scatter_kv_to_slots", model=model,
        shape=dict(layers=layers, n=tokens, KVH=kv_heads, D=head_dim), dtype=_dtype_name(dtype),
        fast=partial(move, kv_kernels.scatter_kv_to_slots, fast_caches, backend=backend),
        reference=partial(move, kv_kernels.scatter_kv_to_slots_reference, ref_caches),
        check=check, bytes_moved=lambda _: layers * per_layer,
        cpu_path_is_reference=True, note=f"{layers} layers (0..K, K={layers - 1}) per timed call")


# -------------------------------------------------------------------------------------------------
# Shapes
# -------------------------------------------------------------------------------------------------

QWEN_VIT = dict(heads=16, head_dim=80)
QWEN_LLM = dict(heads=28, kv_heads=4, head_dim=128)
QWEN_MERGER_HIDDEN = 3584
QWEN_KV_LAYERS = 19  # GlimpsePrune's KV move: layers 0..K, K = 18
CLIP_L = dict(heads=16, head_dim=64, tokens=577, hidden=1024)
LLAVA_LLM = dict(heads=32, kv_heads=32, head_dim=128)
LLAVA_DOMINANT, LLAVA_CONTEXTUAL = 54, 10  # the authors' LLaVA-1.5 64-token budget


def qwen_visionzip_counts(tokens: int) -> tuple[int, int]:
    """(dominant, contextual) for an image of ``tokens`` tokens at the plugin's Qwen2.5-VL default
    ratios (the authors' 0.65 / 0.05)."""
    ratios = VisionZipSettings.QWEN_DEFAULTS
    return visionzip_counts(tokens, ratios["dominant_ratio"], ratios["contextual_ratio"])


# On CPU the score of 4096 patches takes seconds per call (2 cores); 16k patches would take ~16x
# that per call, for each of warmup + repeats + the check, on both paths.
CPU_MAX_SCORE_PATCHES = 4096


@dataclass
class PlannedCase:
    build: Callable[[torch.device, str], Case]
    kernel: str
    label: str
    skip_on_cpu: str = ""  # reason, when the case is too slow for a CPU run


def planned_cases(quick: bool) -> list[PlannedCase]:
    bf16 = torch.bfloat16
    qwen_tokens = (256, 1024) if quick else (1024, 4096, 16384)
    plan: list[PlannedCase] = []

    def add(kernel, label, builder, skip_on_cpu="", **kwargs):
        plan.append(PlannedCase(partial(_build, builder, kwargs), kernel, label, skip_on_cpu))

    for n in qwen_tokens[:1] if quick else qwen_tokens:
        patches = 4 * n  # the score runs over ViT patches, before the 2x2 merge
        add("attention_received_scores", f"qwen2.5-vl vit {n} tok", attention_scores_case,
            skip_on_cpu="" if patches <= CPU_MAX_SCORE_PATCHES else
            f"{patches} ViT patches: {2 * patches**2 * 16 * 80 / 1e12:.2g} TFLOP per call, "
            f"minutes per call on CPU; CUDA only",
            model="qwen2.5-vl-vit", s_q=patches, s=patches, reduce="mean", dtype=bf16, **QWEN_VIT)
    add("attention_received_scores", "llava clip-l cls", attention_scores_case,
        model="llava-clip-l", s_q=1, s=CLIP_L["tokens"], heads=CLIP_L["heads"],
        head_dim=CLIP_L["head_dim"], reduce="sum", dtype=bf16)

    for n in qwen_tokens:
        dominant, contextual = qwen_visionzip_counts(n)
        add("topk_keep_mask", f"qwen2.5-vl {n} tok", topk_keep_mask_case,
            model="qwen2.5-vl", n=n, k=dominant)
        add("topk_indices", f"qwen2.5-vl {n} tok", topk_indices_case,
            model="qwen2.5-vl", n=n, k=dominant)
        add("contextual_merge", f"qwen2.5-vl {n} tok", contextual_merge_case,
            model="qwen2.5-vl", remaining=n - dominant, contextual=contextual,
            hidden=QWEN_MERGER_HIDDEN, key_dim=QWEN_VIT["head_dim"], dtype=bf16,
            key_dtype=torch.float32)
    add("topk_keep_mask", "llava clip-l", topk_keep_mask_case,
        model="llava", n=CLIP_L["tokens"], k=LLAVA_DOMINANT)
    add("topk_indices", "llava clip-l", topk_indices_case,
        model="llava", n=CLIP_L["tokens"], k=LLAVA_DOMINANT)
    add("contextual_merge", "llava clip-l", contextual_merge_case,
        model="llava", remaining=CLIP_L["tokens"] - LLAVA_DOMINANT, contextual=LLAVA_CONTEXTUAL,
        hidden=CLIP_L["hidden"], key_dim=CLIP_L["head_dim"], dtype=bf16, key_dtype=bf16)

    # (requests, image tokens per request): one big image, or several requests batched.
    glimpse_batches = [(2, 1024)] if quick else [(8, 1024), (4, 4096), (1, 16384)]
    for requests, n in glimpse_batches:
        add("glimpse_attention_logits", f"qwen2.5-vl {requests}x{n} tok", glimpse_logits_case,
            model="qwen2.5-vl", requests=requests, image_tokens=n, text_before=16,
            text_after=48, log_softmax=False, dtype=bf16, **QWEN_LLM)
    llava_requests = 2 if quick else 16
    add("glimpse_attention_logits", f"llava {llava_requests}x576 tok", glimpse_logits_case,
        model="llava-1.5", requests=llava_requests, image_tokens=576, text_before=35,
        text_after=30, log_softmax=True, dtype=bf16, **LLAVA_LLM)

    rules = {"threshold": dict(threshold=0.5, min_remain_num=1),
             "max_ratio": dict(threshold=0.5, max_remain_ratio=0.25, min_remain_num=1)}
    for requests, n in ([(4, 1024)] if quick else [(8, 1024), (4, 4096), (1, 16384)]):
        for rule_name, rule in rules.items():
            add("keep_and_compact", f"qwen2.5-vl {requests}x{n} tok {rule_name}",
                keep_and_compact_case, model="qwen2.5-vl", requests=requests, image_tokens=n,
                rule=rule)

    for n in ((1024,) if quick else (1024, 4096, 16384)):
        add("scatter_kv_to_slots", f"qwen2.5-vl {QWEN_KV_LAYERS} layers {n} tok", scatter_kv_case,
            model="qwen2.5-vl", layers=QWEN_KV_LAYERS, tokens=n, kv_heads=QWEN_LLM["kv_heads"],
            head_dim=QWEN_LLM["head_dim"], dtype=bf16)
    return plan


def _build(builder, kwargs, device, backend) -> Case:
    return builder(device, backend, **kwargs)


# -------------------------------------------------------------------------------------------------
# Timing
# -------------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self._flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
                       if device.type == "cuda" else None)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        return [self._one_cuda(fn) if self._flush is not None else self._one_cpu(fn)
                for _ in range(repeats)]

    def _one_cuda(self, fn) -> float:
        self._flush.zero_()  # evict the inputs from L2
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    @staticmethod
    def _one_cpu(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    gbps: float
    pct_peak: float | None
    tflops: float | None = None

    @classmethod
    def of(cls, times_ms: list[float], bytes_moved: int, peak_gbps: float | None,
           min_flops: int | None) -> Timing:
        median = statistics.median(times_ms)
        gbps = bytes_moved / (median * 1e-3) / 1e9
        return cls(median_ms=median, min_ms=min(times_ms), max_ms=max(times_ms), gbps=gbps,
                   pct_peak=None if peak_gbps is None else 100 * gbps / peak_gbps,
                   tflops=None if min_flops is None else min_flops / (median * 1e-3) / 1e12)


def run_case(case: Case, timer: Timer, repeats: int, warmup: int, peak_gbps: float | None,
             fast_backend: str) -> dict[str, Any]:
    reference_out = case.reference()
    fast_out = case.fast()
    timer.sync()
    compared = case.check(fast_out, reference_out)  # raises KernelMismatch
    bytes_moved = case.bytes_moved(reference_out)
    del reference_out, fast_out
    fast = Timing.of(timer.time_ms(case.fast, repeats, warmup), bytes_moved, peak_gbps, case.min_flops)
    reference = Timing.of(timer.time_ms(case.reference, repeats, warmup), bytes_moved, peak_gbps,
                          case.min_flops)
    return dict(
        kernel=case.kernel, model=case.model, shape=case.shape, shape_text=_shape_text(case.shape),
        dtype=case.dtype, backend=fast_backend, reference="torch reference",
        fast_path_is_reference=fast_backend == "cpu" and case.cpu_path_is_reference,
        bytes=bytes_moved, min_flops=case.min_flops,
        fast=dataclasses.asdict(fast), ref=dataclasses.asdict(reference),
        speedup=reference.median_ms / fast.median_ms, correct=True, check=compared, note=case.note)


# -------------------------------------------------------------------------------------------------
# Device, report
# -------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_bandwidth(name: str, device: torch.device,
                   override: float | None) -> tuple[float | None, str]:
    """(peak GB/s or None, where it comes from)."""
    if override is not None:
        return override, "--peak-gbps"
    if device.type != "cuda":
        return None, "none (CPU: give --peak-gbps for a % of peak)"
    upper = name.upper()
    for label, needed, excluded, gbps in PEAK_BANDWIDTH_GBPS:
        if all(s in upper for s in needed) and not any(s in upper for s in excluded):
            return gbps, f"NVIDIA datasheet: {label}"
    return None, f"unknown device {name!r}: GB/s only (give --peak-gbps for a % of peak)"


def library_versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                cuda=torch.version.cuda)


def format_table(rows: list[dict[str, Any]], peak_known: bool) -> str:
    header = ("kernel", "case", "shape", "backend", "median ms", "min-max ms", "GB/s", "% peak",
              "speedup")
    lines = []
    for row in rows:
        for path, timing in (("fast", row["fast"]), ("ref", row["ref"])):
            is_fast = path == "fast"
            backend = row["backend"] if is_fast else "torch-ref"
            if is_fast and row["fast_path_is_reference"]:
                backend += " (= ref)"
            lines.append((
                row["kernel"] if is_fast else "", row["model"] if is_fast else "",
                f"{row['shape_text']} {row['dtype']}" if is_fast else "", backend,
                f"{timing['median_ms']:.3f}", f"{timing['min_ms']:.3f}-{timing['max_ms']:.3f}",
                f"{timing['gbps']:.2f}",
                f"{timing['pct_peak']:.1f}" if timing["pct_peak"] is not None else "-",
                f"{row['speedup']:.2f}x" if is_fast else ""))
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    if not peak_known:
        out.append("% peak: no peak bandwidth known for this device (GB/s only; see --peak-gbps).")
    compute = [r for r in rows if r["fast"]["tflops"] is not None]
    for r in compute:
        out.append(f"compute-bound {r['kernel']} [{r['model']}]: {r['fast']['tflops']:.3g} TFLOP/s "
                   f"({r['backend']}), {r['ref']['tflops']:.3g} TFLOP/s (torch-ref), "
                   f"min FLOPs 2*S_q*S*H*D = {r['min_flops']:.3g}")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="OUT", help="write the JSON report here")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per path (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per path (default 2)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="peak memory bandwidth in GB/s (overrides the datasheet table)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice); on a shared "
                             "CPU, fewer threads than cores keeps other processes from stalling "
                             "every parallel region")
    parser.add_argument("--only", default="",
                        help=f"comma-separated kernels to run (default all: {','.join(KERNELS)})")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    unknown = set(filter(None, args.only.split(","))) - set(KERNELS)
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {list(KERNELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if not vz_kernels.HAS_TRITON:
            raise SystemExit("--device cuda needs triton (the kernels under test)")
        if vz_kernels.INTERPRETED or glimpse_kernels.INTERPRETED or kv_kernels.INTERPRETED:
            raise SystemExit("TRITON_INTERPRET is set: the kernels would be interpreted, not "
                             "compiled; unset it to benchmark")
    fast_backend = "triton" if device.type == "cuda" else "cpu"
    name = device_name(device)
    peak_gbps, peak_source = peak_bandwidth(name, device, args.peak_gbps)
    only = set(filter(None, args.only.split(","))) or set(KERNELS)
    timer = Timer(device)

    print(f"device: {name} ({device.type}); fast path: backend={fast_backend!r}; peak bandwidth: "
          + (f"{peak_gbps:.0f} GB/s ({peak_source})" if peak_gbps else peak_source), flush=True)
    rows, skipped = [], []
    for planned in planned_cases(args.quick):
        if planned.kernel not in only:
            continue
        if device.type == "cpu" and planned.skip_on_cpu:
            skipped.append(dict(kernel=planned.kernel, case=planned.label, reason=planned.skip_on_cpu))
            print(f"  skipped {planned.kernel} [{planned.label}]: {planned.skip_on_cpu}", flush=True)
            continue
        case = planned.build(device, fast_backend)
        row = dict(case=planned.label,
                   **run_case(case, timer, args.repeats, args.warmup, peak_gbps, fast_backend))
        rows.append(row)
        print(f"  {row['kernel']} [{planned.label}]: {row['fast']['median_ms']:.3f} ms vs "
              f"{row['ref']['median_ms']:.3f} ms ref ({row['check']})", flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(format_table(rows, peak_gbps is not None))
    if args.json:
        report = dict(
            device=name, device_type=device.type, fast_backend=fast_backend,
            mode="quick" if args.quick else "full", repeats=args.repeats, warmup=args.warmup,
            timing=("CUDA events per call, L2 flushed before each call" if device.type == "cuda"
                    else "time.perf_counter per call"),
            bandwidth="minimum bytes read + written / median time, decimal GB/s",
            peak_gbps=peak_gbps, peak_source=peak_source, torch_threads=torch.get_num_threads(),
            **library_versions(), rows=rows, skipped=skipped)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
