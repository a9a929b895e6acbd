"""VisionZip's Triton kernels (kernels/visionzip_triton.py) against their torch references, the
CPU path (C++ op) and the engine's torch code in vllm_glimpse/visionzip.py; all on CPU, the
kernels under Triton's interpreter.

The interpreter needs TRITON_INTERPRET=1 before triton is first imported in the process: then
@triton.jit builds interpreted functions, triton.language's own helpers (tl.sum, tl.max,
tl.argmax, tl.cumsum are @jit functions) included. In a pytest session triton may already be
imported by then, and setting the variable for the whole session would also reach the engines
other modules start and any compiled Triton use after this module. So this module runs itself
a second time in a child pytest with the variable set from the start
(test_triton_kernels_under_interpreter): there the path lists include "triton" and the
interpreter-only tests exist. The shapes are small because the interpreter runs every program
instance in numpy.

Each comparison is between independent code: the Triton kernel, the torch reference next to it,
the C++ op (the "cpu" path, only where it differs from the torch reference: the segment mean and
the merge built on it) and a brute-force expectation written in the test. "auto" is not compared
(on CPU tensors it is the "cpu" path); test_auto_routes_cpu_tensors_to_the_cpu_path checks
where it goes.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import vllm_glimpse.visionzip as vz
from tests.triton_interpreter import IN_CHILD, load_compiled_copy, run_module_under_interpreter

KERNELS = "vllm_glimpse.kernels.visionzip_triton"
_TRITON = ("triton",) if IN_CHILD else ()
# Paths with their own code, per operation. The score, top-k and assignment have no C++ op:
# their "cpu" path is the torch reference.
REFERENCE_PATHS = _TRITON + ("torch",)
MERGE_PATHS = _TRITON + ("torch", "cpu")
# Small blocks for the interpreter: several blocks per dimension at these sizes, so the loops
# over blocks, the masks of partial blocks and the running max across blocks are all exercised.
SCORE_BLOCKS = dict(block_q=32, block_k=32)
TOPK_BLOCKS = dict(block_i=32, block_j=32, block_compact=32)
MERGE_BLOCKS = dict(block_m=16, block_t=16, block_d=16, block_merge_m=8, block_h=32)


@pytest.fixture(scope="module")
def vzt():
    module = importlib.import_module(KERNELS)
    # In the child every "triton" comparison must really run the kernels (interpreted).
    assert module.HAS_TRITON and (module.INTERPRETED or not IN_CHILD)
    return module


if not IN_CHILD:

    def test_triton_kernels_under_interpreter():
        run_module_under_interpreter(__file__, "backends or interpreter", min_passed=41)

    def _load_compiled_copy():
        return load_compiled_copy(KERNELS, "_visionzip_triton_compiled")

    def test_compiled_kernels_refuse_cpu_tensors():
        # Without the interpreter the kernels need CUDA tensors: a clear error, not a crash.
        compiled = _load_compiled_copy()
        assert compiled.HAS_TRITON and not compiled.INTERPRETED
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            compiled.topk_indices(torch.zeros(4), 2, backend="triton")
        # auto on CPU never picks them.
        assert torch.equal(compiled.topk_indices(torch.tensor([1.0, 3.0, 2.0]), 2), torch.tensor([1, 2]))


def test_kernels_module_imports_from_package():
    # pyproject maps kernels/ to vllm_glimpse.kernels; the editable install must resolve it.
    module = importlib.import_module(KERNELS)
    assert module.__name__ == KERNELS and callable(module.contextual_merge)


# -------------------------------------------------------------------------------------------------
# 1. attention_received_scores
# -------------------------------------------------------------------------------------------------


def _naive_scores(q, k, scale, reduce):
    """The whole [H, S_q, S] softmax at once, in float64."""
    logits = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    per_head = torch.softmax(logits, dim=-1).sum(dim=1)  # [H, S]
    total = per_head.sum(dim=0)
    return (total / q.shape[1] if reduce == "mean" else total).float()


def _qk(s_q, s, heads, dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # Spread-out logits (x2) so the softmax is far from uniform and errors would show.
    q = (2 * torch.randn(s_q, heads, dim, generator=gen)).to(dtype)
    k = torch.randn(s, heads, dim, generator=gen).to(dtype)
    return q, k


@pytest.mark.parametrize("s_q, s, heads, dim", [(37, 37, 2, 8), (1, 50, 4, 16), (64, 64, 3, 12)])
@pytest.mark.parametrize("chunk", [1, 5, 16, None])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_scores_reference_equals_full_softmax(s_q, s, heads, dim, chunk, reduce):
    from vllm_glimpse.kernels.visionzip_triton import attention_received_scores_reference

    q, k = _qk(s_q, s, heads, dim, seed=s + dim)
    got = attention_received_scores_reference(q, k, reduce=reduce, query_chunk=chunk)
    want = _naive_scores(q, k, dim ** -0.5, reduce)
    assert got.dtype == torch.float32 and got.shape == (s,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Every softmax row sums to one: the scores add up to S_q (head mean) or S_q * H (sum).
    assert math.isclose(got.sum().item(), s_q * (1 if reduce == "mean" else heads), rel_tol=1e-5)


def test_scores_reference_never_builds_the_full_matrix(monkeypatch):
    from vllm_glimpse.kernels import visionzip_triton as kernels

    s, heads, dim = 120, 2, 8
    q, k = _qk(s, s, heads, dim, seed=3)
    want = _naive_scores(q, k, 0.3, "mean")
    seen = []
    softmax = torch.softmax

    def recording_softmax(x, dim):
        seen.append(tuple(x.shape))
        return softmax(x, dim=dim)

    monkeypatch.setattr(torch, "softmax", recording_softmax)
    got = kernels.attention_received_scores_reference(q, k, 0.3, query_chunk=16)
    assert seen and all(shape == (heads, min(16, s - 16 * i), s) for i, shape in enumerate(seen))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # Default chunk: capped by the element budget (made tiny here), never S_q rows at once.
    seen.clear()
    monkeypatch.setattr(kernels, "_REFERENCE_CHUNK_ELEMENTS", heads * s * 8)
    got = kernels.attention_received_scores_reference(q, k, 0.3)
    assert len(seen) == s // 8 and max(shape[1] for shape in seen) == 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("s_q, s, heads, dim, reduce, dtype, scale", [
    (96, 96, 2, 24, "mean", torch.float32, None),  # Qwen2.5-VL: every token queries
    (1, 97, 4, 32, "sum", torch.float32, 0.2),  # LLaVA: the CLS row, summed over heads
    (50, 50, 2, 20, "mean", torch.float16, None),
    (20, 45, 1, 5, "sum", torch.float32, 1.5),
])
def test_scores_backends(vzt, s_q, s, heads, dim, reduce, dtype, scale):
    q, k = _qk(s_q, s, heads, dim, seed=s_q + s, dtype=dtype)
    want = _naive_scores(q, k, dim ** -0.5 if scale is None else scale, reduce)
    got = {
        backend: vzt.attention_received_scores(q, k, scale, reduce=reduce, backend=backend,
                                               query_chunk=16, **SCORE_BLOCKS)
        for backend in REFERENCE_PATHS
    }
    for backend, scores in got.items():
        assert scores.dtype == torch.float32 and scores.shape == (s,), backend
        torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-6, msg=backend)
        torch.testing.assert_close(scores, got["torch"], rtol=1e-5, atol=1e-6, msg=backend)


def test_scores_backends_strided_inputs(vzt):
    # q and k as views into one packed qkv tensor (how a ViT block produces them).
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(40, 3, 2, 16, generator=gen)
    q, k = qkv[:, 0], qkv[:, 1]
    assert not q.is_contiguous()
    want = _naive_scores(q, k, 16 ** -0.5, "mean")
    for backend in REFERENCE_PATHS:
        got = vzt.attention_received_scores(q, k, backend=backend, **SCORE_BLOCKS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=backend)


def test_scores_backends_empty_and_bad_inputs(vzt):
    q, k = _qk(0, 5, 2, 8, seed=0)
    for backend in REFERENCE_PATHS:
        assert torch.equal(vzt.attention_received_scores(q, k, backend=backend), torch.zeros(5))
    q, k = _qk(4, 5, 2, 8, seed=0)
    with pytest.raises(ValueError, match="differ in heads"):
        vzt.attention_received_scores(q, k[:, :1])
    with pytest.raises(ValueError, match="reduce"):
        vzt.attention_received_scores(q, k, reduce="max")
    with pytest.raises(ValueError, match="backend"):
        vzt.attention_received_scores(q, k, backend="gpu")


# -------------------------------------------------------------------------------------------------
# 2. Top-k selection
# -------------------------------------------------------------------------------------------------


def _brute_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent of torch's sort: order by (score desc, index asc) in Python."""
    values = scores.float().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _score_cases():
    gen = torch.Generator().manual_seed(5)
    with_inf = torch.randint(0, 3, (70,), generator=gen).float()
    with_inf[[4, 50, 51]] = float("inf")  # always-kept tokens (LLaVA's CLS gets +inf)
    signed_zero = torch.zeros(40)
    signed_zero[::3] = -0.0  # -0.0 == 0.0: a tie, decided by index
    signed_zero[7] = -1.0
    return {
        "random": torch.randn(96, generator=gen),
        "integers": torch.randint(0, 4, (96,), generator=gen).float(),
        "all_equal": torch.full((80,), 0.25),
        "with_inf": with_inf,
        "signed_zero": signed_zero,
        # Distinct in float64, equal once cast to float32 like the reference does.
        "float64_ties": torch.tensor([1.0, 1.0 + 1e-12, 2.0, 1.0 - 1e-12, 2.0 + 1e-13] * 6,
                                     dtype=torch.float64),
        "bf16": torch.randint(0, 6, (64,), generator=gen).to(torch.bfloat16) / 3,
        "single": torch.tensor([3.0]),
        "empty": torch.zeros(0),
    }


@pytest.mark.parametrize("case", list(_score_cases()))
def test_topk_backends(vzt, case):
    scores = _score_cases()[case]
    n = scores.shape[0]
    for k in sorted({0, 1, 7, max(n - 1, 0), n, n + 5}):
        want = _brute_topk(scores, k)
        assert torch.equal(vz.topk_indices(scores, k), want), (case, k)  # the engine's torch path
        for backend in REFERENCE_PATHS:
            got = vzt.topk_indices(scores, k, backend=backend, **TOPK_BLOCKS)
            assert got.dtype == torch.long and torch.equal(got, want), (case, k, backend, got)
            if k not in (0, 7, n):  # the mask on a few k (the indices above are built from it)
                continue
            mask = vzt.topk_keep_mask(scores, k, backend=backend, block_i=32, block_j=32)
            expected_mask = torch.zeros(n, dtype=torch.bool)
            expected_mask[want] = True
            assert mask.dtype == torch.bool and torch.equal(mask, expected_mask), (case, k, backend)


def test_topk_rejects_bad_inputs(vzt):
    with pytest.raises(ValueError, match="k must be >= 0"):
        vzt.topk_indices(torch.zeros(4), -1, backend="triton")
    with pytest.raises(ValueError, match="1-D"):
        vzt.topk_keep_mask(torch.zeros(2, 4), 1)


# -------------------------------------------------------------------------------------------------
# 3. Contextual merge
# -------------------------------------------------------------------------------------------------


def test_member_positions_closed_form(vzt):
    for num_remaining in range(0, 41):
        for contextual in range(0, 46):
            targets = vz.contextual_targets(num_remaining, contextual)
            is_target = torch.zeros(num_remaining, dtype=torch.bool)
            is_target[targets] = True
            want = torch.nonzero(~is_target).squeeze(-1) if targets.numel() else torch.arange(num_remaining)
            got = vzt.member_positions(num_remaining, contextual)
            assert torch.equal(got, want), (num_remaining, contextual, got, want)


def _check_merge_backends(vzt, hidden, keys, contextual, *, exact_assignment=None):
    """All paths agree: targets and assignment exactly, merged rows to float rounding."""
    want_merged, want_targets, want_assign = vz.merge_contextual(hidden, keys, contextual)
    if exact_assignment is not None:
        assert torch.equal(want_assign, exact_assignment)
    for backend in MERGE_PATHS:
        merged, targets, assign = vzt.contextual_merge(hidden, keys, contextual, backend=backend,
                                                       **MERGE_BLOCKS)
        assert torch.equal(targets, want_targets), backend
        assert assign.dtype == torch.long and torch.equal(assign, want_assign), (backend, assign, want_assign)
        assert merged.dtype == hidden.dtype and merged.shape == want_merged.shape, backend
        torch.testing.assert_close(merged, want_merged, rtol=1e-5, atol=1e-5, msg=backend)
    return want_merged, want_targets, want_assign


@pytest.mark.parametrize("num_remaining, contextual, hidden_size, key_dim", [
    (90, 10, 24, 16),  # step 9, no tail
    (64, 7, 16, 8),  # step 9: 7 * 9 = 63, one member after the last stride block
    (120, 40, 20, 16),  # 3 target blocks: the running max across blocks decides
    (100, 3, 20, 36),  # key dim over the 16-wide block: the loop over key chunks
    (40, 40, 8, 8),  # C = R: all targets, no members, merged == hidden
    (25, 40, 8, 8),  # C > R: step 1, only R targets
    (1, 1, 8, 4),
    (1, 0, 8, 4),  # C = 0: nothing merged
    (30, 0, 8, 4),  # members but no target: nothing merged
    (0, 3, 8, 4),
])
def test_contextual_merge_backends(vzt, num_remaining, contextual, hidden_size, key_dim):
    gen = torch.Generator().manual_seed(num_remaining * 100 + contextual)
    hidden = torch.randn(num_remaining, hidden_size, generator=gen)
    keys = torch.randn(num_remaining, key_dim, generator=gen)
    merged, targets, assign = _check_merge_backends(vzt, hidden, keys, contextual)
    expected_targets = min(contextual, num_remaining)
    assert targets.numel() == expected_targets and assign.numel() == (num_remaining - expected_targets
                                                                       if expected_targets else 0)
    if contextual >= num_remaining:  # every token is a target and has no member: unchanged
        assert torch.equal(merged, hidden)
    if expected_targets and assign.numel():  # the merged rows are what the rule says
        is_target = torch.zeros(num_remaining, dtype=torch.bool)
        is_target[targets] = True
        members = hidden[~is_target]
        for slot in range(expected_targets):
            mine = members[assign == slot]
            want = hidden[targets[slot]] + (mine.mean(dim=0) if len(mine) else 0)
            torch.testing.assert_close(merged[slot], want, rtol=1e-5, atol=1e-5)


def test_contextual_merge_backends_ties_go_to_the_first_target(vzt):
    # One-hot keys, scaled: normalised they are exactly one-hot, so cosines are exactly 0 or 1
    # and every member ties between all targets of its direction (or between all targets, for
    # direction 3, which no target has). step = 80 // 40 = 2: targets at 0, 2, ..., 78, in three
    # 16-wide target blocks, each block holding every direction: the earliest block must win.
    num_remaining, contextual = 80, 40
    direction = torch.tensor([i % 3 for i in range(num_remaining)])
    direction[[7, 13, 27]] = 3
    keys = torch.nn.functional.one_hot(direction, 4).float() * torch.arange(1, num_remaining + 1)[:, None]
    hidden = torch.randn(num_remaining, 12, generator=torch.Generator().manual_seed(1))
    targets = list(range(0, num_remaining, 2))
    members = [p for p in range(num_remaining) if p not in targets]
    target_dirs = direction[targets].tolist()
    first = [next((slot for slot, d in enumerate(target_dirs) if d == direction[p]), 0) for p in members]
    assert set(first) == {0, 1, 2}
    merged, _, assign = _check_merge_backends(vzt, hidden, keys, contextual,
                                              exact_assignment=torch.tensor(first))
    # Targets after the first of their direction get no member and stay as they are.
    lonely = [slot for slot in range(contextual) if slot not in set(first)]
    assert len(lonely) == contextual - 3
    assert all(torch.equal(merged[slot], hidden[targets[slot]]) for slot in lonely)


def test_contextual_merge_backends_zero_keys(vzt):
    # A zero key normalises to NaN (0/0) in the reference; torch.argmax ranks NaN first, and the
    # kernel must too: a zero member goes to target 0, a zero target attracts every member.
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(20, 6, generator=gen)
    keys = torch.randn(20, 4, generator=gen)
    keys[1] = 0  # a member (targets at 0, 5, 10, 15)
    _check_merge_backends(vzt, hidden, keys, 4)
    keys[10] = 0  # target slot 2: every row has a NaN there; the zero member's row is all NaN
    _, _, assign = _check_merge_backends(vzt, hidden, keys, 4)
    assert torch.equal(assign, torch.tensor([0] + [2] * 15))


@pytest.mark.parametrize("num_members, num_targets, hidden_size", [(53, 7, 40), (0, 3, 16), (5, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_mean_backends(vzt, num_members, num_targets, hidden_size, dtype):
    gen = torch.Generator().manual_seed(num_members + hidden_size)
    members = torch.randn(num_members, hidden_size, generator=gen).to(dtype)
    targets = torch.randn(num_targets, hidden_size, generator=gen).to(dtype)
    low = 1 if num_targets > 1 else 0  # target 0 without members when possible
    assignment = torch.randint(low, num_targets, (num_members,), generator=gen)
    want = vz.segment_mean_merge_reference(targets, members, assignment)
    for backend in MERGE_PATHS:
        got = vzt.segment_mean_merge(targets, members, assignment, backend=backend, block_m=8, block_h=16)
        assert got.dtype == dtype and got.shape == (num_targets, hidden_size), backend
        # fp32: to summation-order rounding. bf16: to one bf16 rounding step (assert_close's
        # bf16 default), since fp32 sums in another order may round to the neighbouring bf16.
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(got, want, msg=backend, **tolerance)
        if num_targets > 1:
            assert torch.equal(got[0], targets[0]), backend


def test_assign_to_targets_backends(vzt):
    gen = torch.Generator().manual_seed(4)
    member_keys, target_keys = torch.randn(45, 20, generator=gen), torch.randn(19, 20, generator=gen)
    normed_m = member_keys / member_keys.norm(dim=-1, keepdim=True)
    normed_t = target_keys / target_keys.norm(dim=-1, keepdim=True)
    want = torch.tensor([max(range(19), key=lambda t: (normed_m[m] @ normed_t[t]).item()) for m in range(45)])
    for backend in REFERENCE_PATHS:
        got = vzt.assign_to_targets(member_keys, target_keys, backend=backend, block_m=16,
                                    block_t=16, block_d=16)
        assert torch.equal(got, want), backend
    with pytest.raises(ValueError, match="at least one target"):
        vzt.assign_to_targets(member_keys, target_keys[:0])


# -------------------------------------------------------------------------------------------------
# Wire-up in vllm_glimpse/visionzip.py and backend selection
# -------------------------------------------------------------------------------------------------


def _brute_visionzip(hidden, scores, keys, dominant, contextual, order):
    """VisionZip for one image in plain Python loops over slots (no shared code with the module
    beyond torch arithmetic): top-k by (score desc, slot asc), strided targets among the rest,
    first most-similar target, target + mean of its members; then the requested order."""
    n = hidden.shape[0]
    values = scores.float().tolist()
    dominant_slots = sorted(sorted(range(n), key=lambda i: (-values[i], i))[:dominant])
    rest = [i for i in range(n) if i not in set(dominant_slots)]
    step = max(1, len(rest) // contextual) if contextual else 0
    targets = [rest[p] for p in range(0, len(rest), step)][:contextual] if contextual else []
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    members = {t: [] for t in targets}
    for i in rest:
        if i not in members:
            sims = [float(unit[i] @ unit[t]) for t in targets]
            members[targets[sims.index(max(sims))]].append(i)
    token = {i: hidden[i].float() for i in dominant_slots}
    for t in targets:
        extra = torch.stack([hidden[m].float() for m in members[t]]).mean(0) if members[t] else 0
        token[t] = hidden[t].float() + extra
    slots = sorted(token) if order == "raster" else dominant_slots + targets
    return torch.stack([token[i] for i in slots]).to(hidden.dtype), torch.tensor(slots)


# The module's backends: the kernels (in the child) and its torch code.
VISIONZIP_PATHS = _TRITON + ("torch",)


@pytest.mark.parametrize("order", ["raster", "dominant_first"])
@pytest.mark.parametrize("n, dominant, contextual", [(120, 30, 9), (64, 40, 10), (9, 1, 8)])
def test_visionzip_order_backends(vzt, order, n, dominant, contextual):
    """Every backend gives the brute-force tokens, slots and order: "raster" (Qwen: kept slots
    ascending, each contextual token in its target's slot) or "dominant_first" (LLaVA)."""
    gen = torch.Generator().manual_seed(n + dominant)
    hidden = torch.randn(n, 16, generator=gen)
    keys = torch.randn(n, 8, generator=gen)
    scores = torch.randint(0, 5, (n,), generator=gen).float()  # many ties
    want_tokens, want_slots = _brute_visionzip(hidden, scores, keys, dominant, contextual, order)
    for backend in VISIONZIP_PATHS:
        with vz.use_backend(backend):
            got = vz.visionzip(hidden, scores, keys, dominant, contextual, order=order)
        assert torch.equal(got.slots, want_slots), (backend, got.slots, want_slots)
        torch.testing.assert_close(got.tokens, want_tokens, rtol=1e-5, atol=1e-5, msg=backend)
    if order == "raster":  # some target precedes a dominant slot: the two orders differ here
        other = vz.visionzip(hidden, scores, keys, dominant, contextual, order="dominant_first")
        assert not torch.equal(other.slots, got.slots)


def test_place_in_raster_order_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="3 tokens for 4 slots"):
        vz.place_in_raster_order(torch.zeros(3, 2), torch.tensor([0, 2]), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="order must be one of"):
        vz.visionzip(torch.zeros(4, 2), torch.zeros(4), torch.zeros(4, 2), 2, 1, order="slots")


def test_auto_routes_cpu_tensors_to_the_cpu_path(vzt, monkeypatch):
    """On CPU tensors "auto" is the CPU path (C++ segment mean), even with the interpreter on."""
    hidden, keys = torch.randn(20, 6), torch.randn(20, 4)
    assert vzt._resolve("auto", hidden) == "cpu"
    calls = []
    monkeypatch.setattr(vzt, "_segment_mean_merge_cpu",
                        lambda *a, **kw: calls.append("cpu") or vz.segment_mean_merge_reference(*a))
    vzt.contextual_merge(hidden, keys, 4)
    assert calls == ["cpu"]


if IN_CHILD:

    def test_interpreter_visionzip_routes_to_triton(vzt, monkeypatch):
        gen = torch.Generator().manual_seed(9)
        n = 120
        hidden = torch.randn(n, 16, generator=gen)
        keys = torch.randn(n, 8, generator=gen)
        scores = torch.randint(0, 5, (n,), generator=gen).float()  # many ties
        calls = []
        for name in ("topk_indices", "contextual_merge"):
            original = getattr(vzt, name)
            monkeypatch.setattr(vzt, name,
                                lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
        results = {}
        for backend in ("triton", "torch", "auto"):
            with vz.use_backend(backend):
                results[backend] = vz.visionzip(hidden, scores, keys, dominant=30, contextual=9,
                                                always_keep=torch.tensor([0]), order="raster")
        # Only the forced run went to the kernels: auto on CPU tensors is the torch path (so it
        # is not compared: the same code as "torch").
        assert calls == ["topk_indices", "contextual_merge"]
        want, got = results["torch"], results["triton"]
        assert want.dominant_index[0] == 0 and want.tokens.shape == (39, 16)
        for field in ("dominant_index", "target_index", "assignment", "slots"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
        assert vz._BACKEND == "auto"


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend"), vz.use_backend("cuda"):
        pass
    assert vz._BACKEND == "auto"
