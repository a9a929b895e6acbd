"""GlimpsePrune's Triton kernels (kernels/glimpse_triton.py) against their CPU path and torch
references; all on CPU, the kernels under Triton's interpreter.

As in test_kernels_visionzip.py, the interpreter needs TRITON_INTERPRET=1 before triton is first
imported in the process, so this module runs itself a second time in a child pytest with the
variable set (test_triton_kernels_under_interpreter): there BACKENDS includes "triton"; here the
same comparisons run between the torch, CPU and auto paths. Shapes are small (the interpreter
runs every program instance in numpy); the block sizes are smaller than the defaults so that
several blocks, partial blocks and blocks straddling requests all occur.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from tests.triton_interpreter import IN_CHILD, load_compiled_copy, run_module_under_interpreter
from vllm_glimpse.glimpse.keep_rule import keep_mask

KERNELS = "vllm_glimpse.kernels.glimpse_triton"
# Every backend named here is different code: "torch" (a loop over requests on the engine's
# per-request functions), "cpu" (vectorised torch), "triton" (the kernels, child process only).
# "auto" resolves to "cpu" on CPU tensors, so it is not listed (it would compare cpu with itself).
BACKENDS = ("triton", "torch", "cpu") if IN_CHILD else ("torch", "cpu")
LOGIT_BLOCKS = dict(block_n=16, block_s=16)
KEEP_BLOCKS = dict(block_compact=16)


@pytest.fixture(scope="module")
def gpt():
    module = importlib.import_module(KERNELS)
    assert module.HAS_TRITON and (module.INTERPRETED or not IN_CHILD)
    return module


if not IN_CHILD:

    def test_triton_kernels_under_interpreter():
        run_module_under_interpreter(__file__, "backends or interpreter", min_passed=21)

    def _load_compiled_copy():
        return load_compiled_copy(KERNELS, "_glimpse_triton_compiled")

    def test_compiled_kernels_refuse_cpu_tensors():
        compiled = _load_compiled_copy()
        assert compiled.HAS_TRITON and not compiled.INTERPRETED
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            compiled.keep_and_compact(torch.zeros(4), torch.tensor([0, 4]), backend="triton")
        # auto on CPU never picks them.
        got = compiled.keep_and_compact(torch.tensor([1.0, -3.0, 2.0]), torch.tensor([0, 3]))
        assert got.kept_index.tolist() == [0, 2]


def test_kernels_module_imports_from_package():
    module = importlib.import_module(KERNELS)
    assert module.__name__ == KERNELS and callable(module.glimpse_attention_logits)


# -------------------------------------------------------------------------------------------------
# Paged-cache fixtures
# -------------------------------------------------------------------------------------------------


class Paged:
    """A batch written into a paged key cache: dense keys per request, their pages shuffled."""

    def __init__(self, seq_lens, images, heads, kv_heads, dim, block_size=16, *, seed=0,
                 dtype=torch.float32, strided=False):
        gen = torch.Generator().manual_seed(seed)
        self.seq_lens = torch.tensor(seq_lens)
        self.dense = [torch.randn(s, kv_heads, dim, generator=gen).to(dtype) for s in seq_lens]
        pages = [math.ceil(s / block_size) for s in seq_lens]
        num_blocks = sum(pages) + 3  # spare pages full of garbage
        max_blocks = max(pages) + 1
        if strided:  # the key half of a [2, blocks, kv_heads, block, dim] buffer: not contiguous
            buffer = torch.randn(2, num_blocks, kv_heads, block_size, dim, generator=gen).to(dtype)
            self.key_cache = buffer[0].transpose(1, 2)
            assert not self.key_cache.is_contiguous()
        else:
            self.key_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
        order = torch.randperm(num_blocks, generator=gen)
        # Unused table entries point at a real page: reading through them would give wrong keys.
        self.block_table = torch.full((len(seq_lens), max_blocks), int(order[-1]), dtype=torch.int32)
        used = 0
        for b, s in enumerate(seq_lens):
            for page in range(pages[b]):
                block = int(order[used])
                used += 1
                self.block_table[b, page] = block
                rows = self.dense[b][page * block_size:(page + 1) * block_size]
                self.key_cache[block, :rows.shape[0]] = rows
        flat = [torch.tensor([p for lo, hi in imgs for p in range(lo, hi)], dtype=torch.long)
                for imgs in images]
        self.positions = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long)
        self.offsets = torch.tensor([0] + [len(f) for f in flat]).cumsum(0)
        self.q = torch.randn(len(seq_lens), heads, dim, generator=gen).to(dtype) * 2

    def args(self):
        return self.q, self.key_cache, self.block_table, self.positions, self.offsets


def _dense_logits(paged: Paged, scale: float, log_softmax: bool) -> torch.Tensor:
    """From the dense keys, float64, no paging involved."""
    out = []
    bounds = paged.offsets.tolist()
    for b, keys in enumerate(paged.dense):
        heads = paged.q.shape[1]
        keys = keys.double().repeat_interleave(heads // keys.shape[1], dim=1)  # [S, H, D]
        logits = torch.einsum("hd,shd->sh", paged.q[b].double(), keys) * scale
        if log_softmax:
            logits = torch.log_softmax(logits, dim=0)
        out.append(logits[paged.positions[bounds[b]:bounds[b + 1]]])
    return torch.cat(out).float()


# Request 0: two images (20 + 11 tokens) over three pages; request 1: text only; request 2: one
# image ending just before its glimpse token (the last position).
CASES = {
    "gqa": dict(seq_lens=[45, 10, 37], images=[[(3, 23), (30, 41)], [], [(5, 36)]],
                heads=4, kv_heads=2, dim=32),
    # Request 2 is shorter than one 16-key block of the logsumexp kernel: lanes that never see
    # a key must not turn its logsumexp into NaN.
    "mha_odd_dim": dict(seq_lens=[17, 33, 12], images=[[(0, 16)], [(1, 2), (16, 33)], [(2, 11)]],
                        heads=2, kv_heads=2, dim=20),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("log_softmax", [False, True])
def test_logits_reference_equals_dense(gpt, case, log_softmax):
    paged = Paged(**CASES[case], seed=1)
    scale = 0.2
    got = gpt.glimpse_attention_logits_reference(
        *paged.args(), scale, seq_lens=paged.seq_lens if log_softmax else None)
    want = _dense_logits(paged, scale, log_softmax)
    assert got.dtype == torch.float32 and got.shape == (paged.positions.numel(), paged.q.shape[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if log_softmax:  # log-probabilities: all negative
        assert (got < 0).all()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("log_softmax", [False, True])
def test_logits_backends(gpt, case, log_softmax):
    paged = Paged(**CASES[case], seed=2)
    seq_lens = paged.seq_lens if log_softmax else None
    want = _dense_logits(paged, paged.q.shape[-1] ** -0.5, log_softmax)  # default scale
    for backend in BACKENDS:
        got = gpt.glimpse_attention_logits(*paged.args(), seq_lens=seq_lens, backend=backend,
                                           **LOGIT_BLOCKS)
        assert got.dtype == torch.float32 and got.shape == want.shape, backend
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_backends_strided_cache(gpt, dtype):
    # vLLM-style key view of a larger buffer (not contiguous), int32 block table, bf16 keys.
    paged = Paged(**CASES["gqa"], seed=3, dtype=dtype, strided=True)
    want = gpt.glimpse_attention_logits_reference(*paged.args(), 0.125, seq_lens=paged.seq_lens)
    torch.testing.assert_close(want, _dense_logits(paged, 0.125, True), rtol=1e-5, atol=1e-5)
    for backend in BACKENDS:
        got = gpt.glimpse_attention_logits(*paged.args(), 0.125, seq_lens=paged.seq_lens,
                                           backend=backend, **LOGIT_BLOCKS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=backend)


def test_logits_backends_no_image_tokens(gpt):
    paged = Paged(seq_lens=[20, 5], images=[[], []], heads=4, kv_heads=2, dim=16, seed=4)
    for backend in BACKENDS:
        for seq_lens in (None, paged.seq_lens):
            got = gpt.glimpse_attention_logits(*paged.args(), seq_lens=seq_lens, backend=backend)
            assert got.shape == (0, 4), backend


def test_logits_validation(gpt):
    paged = Paged(**CASES["gqa"], seed=5)
    q, cache, table, positions, offsets = paged.args()
    with pytest.raises(ValueError, match="KV heads"):
        gpt.glimpse_attention_logits(q[:, :3], cache, table, positions, offsets)
    with pytest.raises(ValueError, match="image_offsets"):
        gpt.glimpse_attention_logits(q, cache, table, positions, offsets[:-1])
    for backend in ("cpu", "torch"):  # value checks: the host-side paths only
        bad = positions.clone()
        bad[-1] = 37  # request 2's glimpse is at 36: position 37 is beyond its sequence
        with pytest.raises(ValueError, match="request 2"):
            gpt.glimpse_attention_logits(q, cache, table, bad, offsets, seq_lens=paged.seq_lens,
                                         backend=backend)
        with pytest.raises(ValueError, match="rise"):
            gpt.glimpse_attention_logits(q, cache, table, positions, offsets.flip(0), backend=backend)


# -------------------------------------------------------------------------------------------------
# Keep rule + compaction
# -------------------------------------------------------------------------------------------------


def _scores(sizes, seed, kind="normal"):
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    if kind == "ties":  # few distinct values: ties everywhere, across every top-k cut
        s = torch.randint(-2, 3, (total,), generator=gen).float()
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    elif kind == "high":
        s = torch.randint(3, 6, (total,), generator=gen).float()
    else:
        s = torch.randn(total, generator=gen) * 2
    return s, torch.tensor([0] + list(sizes)).cumsum(0)


KEEP_CASES = {
    # Default rule (0.5, min 1); sizes straddle the 16-token blocks; an empty request.
    "default": (([7, 45, 0, 48], 1, "normal"), {}),
    # Everything below threshold -> min_remain_num top-up, the cut inside runs of ties.
    "ties_topup": (([30, 0, 41, 9], 2, "ties"), dict(threshold=0.99, min_remain_num=[5, 3, 12, 4])),
    # Everything above threshold -> max_remain_ratio cap, ties again.
    "all_above_cap": (([40, 33, 1], 3, "high"), dict(max_remain_ratio=0.111)),
    "cap_then_topup": (([40, 33], 3, "high"), dict(max_remain_ratio=0.05, min_remain_num=4)),
    "fixed_ratio_ties": (([25, 50, 0, 3], 4, "ties"), dict(fixed_remain_ratio=0.3, threshold=0.0)),
    # N = 1 requests: below threshold (top-up 1), above, fixed ratio (clamped to 1), cap at 0.
    "single_tokens": (([1, 1, 1, 1], 5, "ties"),
                      dict(threshold=[0.99, 0.01, 0.5, 0.01], fixed_remain_ratio=[None, None, 0.1, None],
                           max_remain_ratio=[None, None, None, 0.0], min_remain_num=[1, 0, 1, 0])),
    # Per-request parameters as tensors (NaN / 0: unset).
    "per_request": (([37, 0, 50, 13], 6, "ties"),
                    dict(threshold=torch.tensor([0.5, 0.2, 0.9, 0.3]),
                         max_remain_ratio=torch.tensor([float("nan"), 0.111, 0.5, float("nan")]),
                         min_remain_num=torch.tensor([1, 0, 4, 2]),
                         fixed_remain_ratio=torch.tensor([float("nan"), float("nan"), float("nan"), 0.25]))),
    "no_min_no_tokens_kept": (([20, 20], 7, "normal"), dict(threshold=0.9999, min_remain_num=None)),
    "all_empty": (([0, 0, 0], 8, "normal"), dict(max_remain_ratio=0.5)),
}


def _expected_masks(scores, offsets, **kwargs):
    """keep_rule.keep_mask per request, parameters unpacked by hand."""
    bounds = offsets.tolist()
    batch = len(bounds) - 1

    def at(name, b, default):
        value = kwargs.get(name, default)
        if isinstance(value, torch.Tensor):
            value = value[b].item()
        elif isinstance(value, (list, tuple)):
            value = value[b]
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    masks = []
    for b in range(batch):
        mins = at("min_remain_num", b, 1)
        masks.append(keep_mask(scores[bounds[b]:bounds[b + 1]],
                               threshold=at("threshold", b, 0.5),
                               max_remain_ratio=at("max_remain_ratio", b, None),
                               min_remain_num=mins if mins else None,
                               fixed_remain_ratio=at("fixed_remain_ratio", b, None)))
    return masks


def _check_result(result, scores, offsets, masks, trim=True):
    bounds = offsets.tolist()
    mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    assert result.keep_mask.dtype == torch.bool and torch.equal(result.keep_mask, mask)
    kept = torch.nonzero(mask).squeeze(-1)
    local = torch.cat([torch.nonzero(m).squeeze(-1) for m in masks]) if masks else kept
    counts = [int(m.sum()) for m in masks]
    offsets = torch.tensor(counts, dtype=torch.long).cumsum(0).tolist()
    assert result.kept_offsets.tolist() == [0] + list(offsets)
    pad = [] if trim else [-1] * (scores.numel() - kept.numel())
    assert result.kept_index.dtype == torch.long and result.kept_index.tolist() == kept.tolist() + pad
    assert result.kept_local.tolist() == local.tolist() + pad
    for b in range(len(bounds) - 1):  # consistency of the three outputs
        lo, hi = result.kept_offsets[b:b + 2].tolist()
        assert torch.equal(result.kept_index[lo:hi] - bounds[b], result.kept_local[lo:hi])


@pytest.mark.parametrize("case", sorted(KEEP_CASES))
def test_keep_backends(gpt, case):
    (sizes, seed, kind), kwargs = KEEP_CASES[case]
    scores, offsets = _scores(sizes, seed, kind)
    masks = _expected_masks(scores, offsets, **kwargs)
    for backend in BACKENDS:
        for trim in (True, False):
            if backend == "triton" and not trim and case not in ("ties_topup", "all_empty"):
                continue  # interpreter time: untrimmed output checked on two cases
            result = gpt.keep_and_compact(scores, offsets, trim=trim, backend=backend,
                                          **kwargs, **KEEP_BLOCKS)
            try:
                _check_result(result, scores, offsets, masks, trim)
            except AssertionError as exc:
                raise AssertionError(f"{case} backend={backend} trim={trim}: {exc}") from exc


def test_keep_cases_exercise_what_they_claim():
    """The cases above are not vacuous: the rule branches they name do fire, and ties sit right at
    the top-k cuts (a kernel breaking ties the other way would fail test_keep_backends)."""
    def setup(case):
        (sizes, seed, kind), kwargs = KEEP_CASES[case]
        scores, offsets = _scores(sizes, seed, kind)
        return scores, offsets, _expected_masks(scores, offsets, **kwargs), kwargs

    scores, offsets, masks, kw = setup("ties_topup")
    bounds = offsets.tolist()
    for b, m in enumerate(masks):
        seg = scores[bounds[b]:bounds[b + 1]]
        if seg.numel():
            k = min(seg.numel(), kw["min_remain_num"][b])
            assert int(m.sum()) == k  # nothing above 0.99: exactly the top-up
            if k < seg.numel():  # the cut falls inside a run of equal scores, lower index wins
                cut = seg[m].min()
                assert (seg[~m] == cut).any()
                assert torch.nonzero(seg == cut).max() > torch.nonzero(m & (seg == cut)).max()
    scores, offsets, masks, _ = setup("all_above_cap")
    assert [int(m.sum()) for m in masks] == [4, 3, 1]  # int(0.111 * 40), int(0.111 * 33), clamp to 1
    scores, offsets, masks, _ = setup("fixed_ratio_ties")
    assert [int(m.sum()) for m in masks] == [7, 15, 0, 1]
    scores, offsets, masks, _ = setup("no_min_no_tokens_kept")
    assert [int(m.sum()) for m in masks] == [0, 0]


def test_keep_by_hand(gpt):
    # Ties toward the lower index; the ratio test is kept / N > r in float64 (3/10 == 0.3 is not > 0.3).
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0,   # request 0: fixed 0.4 -> top 2 = {1, 2}
                           -1.0, 2.0, 2.0, 2.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0,  # r1: 3 of 10 above
                           -1.0, 2.0, 2.0, 2.0, 2.0, -1.0, -1.0, -1.0, -1.0, -1.0])  # r2: 4 of 10 above
    offsets = torch.tensor([0, 5, 15, 25])
    kw = dict(fixed_remain_ratio=[0.4, None, None], max_remain_ratio=[None, 0.3, 0.3])
    for backend in BACKENDS if IN_CHILD else ("cpu", "torch"):
        got = gpt.keep_and_compact(scores, offsets, backend=backend, **kw, **KEEP_BLOCKS)
        assert got.kept_local.tolist() == [1, 2, 1, 2, 3, 1, 2, 3], backend
        assert got.kept_index.tolist() == [1, 2, 6, 7, 8, 16, 17, 18], backend
        assert got.kept_offsets.tolist() == [0, 2, 5, 8], backend


if IN_CHILD:

    def test_interpreter_keep_by_hand(gpt):
        test_keep_by_hand(gpt)


def test_keep_ratio_counts_match_python(gpt):
    # _plan's top-k sizes and cap decisions against Python's int(r * n) and kept / n > r.
    ratios = [0.111, 0.07, 0.1, 0.3, 1 / 3, 0.29, 0.57, 0.99, 1.0, 0.0, -0.5]
    sizes = [1, 3, 7, 9, 10, 27, 100, 256, 1000, 1001]
    for n in sizes:
        for r in ratios:
            for count in {0, 1, n // 3, max(0, int(r * n)), max(0, min(n, int(r * n) + 1)), n}:
                scores = torch.cat([torch.full((count,), 5.0), torch.full((n - count,), -5.0)])
                offsets = torch.tensor([0, n])
                params = gpt._rule_params(1, "cpu", 0.5, r, None, None)
                _, _, _, use_above, limit = gpt._plan(scores, offsets, *params)
                capped = count / n > r
                assert bool(use_above[0]) == (not capped), (n, r, count)
                assert int(limit[0]) == (min(n, max(1, int(r * n))) if capped else 0), (n, r, count)
                params = gpt._rule_params(1, "cpu", 0.5, None, None, r)
                _, _, _, _, limit = gpt._plan(scores, offsets, *params)
                assert int(limit[0]) == min(n, max(1, int(r * n))), (n, r)


def test_keep_validation(gpt):
    with pytest.raises(ValueError, match="NaN"):
        gpt.keep_and_compact(torch.tensor([0.0, float("nan")]), torch.tensor([0, 2]), backend="cpu")
    with pytest.raises(ValueError, match="NaN"):
        gpt.keep_and_compact(torch.tensor([0.0, float("nan")]), torch.tensor([0, 2]), backend="torch")
    with pytest.raises(ValueError, match="rise"):
        gpt.keep_and_compact(torch.zeros(3), torch.tensor([0, 2]), backend="cpu")
    with pytest.raises(ValueError, match="per-request"):
        gpt.keep_and_compact(torch.zeros(3), torch.tensor([0, 3]), threshold=[0.5, 0.5])
    with pytest.raises(ValueError, match="backend"):
        gpt.keep_and_compact(torch.zeros(3), torch.tensor([0, 3]), backend="cuda")


def test_logits_to_keep_end_to_end_backends(gpt):
    # The intended use: logits for the batch -> (the VIP, here a fixed head mean) -> keep rule.
    paged = Paged(**CASES["gqa"], seed=9)
    results = {}
    for backend in BACKENDS:
        logits = gpt.glimpse_attention_logits(*paged.args(), backend=backend, **LOGIT_BLOCKS)
        vip = logits.mean(dim=1).round()  # rounded: ties
        results[backend] = (vip, gpt.keep_and_compact(vip, paged.offsets, max_remain_ratio=0.2,
                                                      backend=backend, **KEEP_BLOCKS))
    vip, want = results["torch"]
    for backend, (got_vip, got) in results.items():
        # Rounded logits can differ only where the float32 sums sit within rounding of .5.
        assert torch.equal(got_vip, vip), backend
        for field in want._fields:
            assert torch.equal(getattr(got, field), getattr(want, field)), (backend, field)


@pytest.mark.parametrize("case", ["ties_topup", "per_request", "no_min_no_tokens_kept"])
def test_keep_backends_force_keep(gpt, case):
    """Tokens forced kept (anchors, a request with non-finite VIP output) are ORed in after the
    rule, the counts and indices following."""
    (sizes, seed, kind), kwargs = KEEP_CASES[case]
    scores, offsets = _scores(sizes, seed, kind)
    force = torch.rand(scores.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.2
    bounds = offsets.tolist()
    masks = [m | force[bounds[b]:bounds[b + 1]]
             for b, m in enumerate(_expected_masks(scores, offsets, **kwargs))]
    assert any(bool((f & ~m).any()) for f, m in zip(
        force.split([b - a for a, b in zip(bounds, bounds[1:])]),
        _expected_masks(scores, offsets, **kwargs)))  # forcing changes something
    for backend in BACKENDS:
        result = gpt.keep_and_compact(scores, offsets, force_keep=force, backend=backend, **kwargs,
                                      **KEEP_BLOCKS)
        _check_result(result, scores, offsets, masks)


def test_segment_ranks_equal_per_request_stable_sort(gpt):
    """The Triton path's ranks (two stable sorts over the whole batch) against each request's own
    stable descending sort, at a size where a pairwise count would be quadratic: ties, -0.0 next
    to +0.0, infinities, requests of 1 and 16,384 tokens, an empty one."""
    sizes = [16384, 1, 0, 3000, 7]
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(-3, 4, (sum(sizes),), generator=gen).float()
    x[torch.rand(x.shape[0], generator=gen) < 0.3] = -0.0
    x[::97] = float("inf")
    x[5::101] = float("-inf")
    offsets = torch.tensor([0] + sizes).cumsum(0)
    req = gpt._token_requests(offsets, x.shape[0])
    got = gpt._segment_ranks(x, req, offsets)
    bounds = offsets.tolist()
    for b in range(len(sizes)):
        seg = x[bounds[b]:bounds[b + 1]] + 0.0
        order = torch.sort(seg, descending=True, stable=True).indices
        want = torch.empty_like(order)
        want[order] = torch.arange(order.numel())
        assert torch.equal(got[bounds[b]:bounds[b + 1]], want), b
