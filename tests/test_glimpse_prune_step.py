"""The batched keep decision of a step (vllm_glimpse/engine/prune_step.py) on one mixed batch:
per-request keep rules, ties at the top-k cut, a one-token image, a request of two images, a
request whose VIP output is not finite, anchors, a prompt ending in an image token, a row of a
request that does not prune. Each backend of the keep rule ("torch": the per-request reference
loop, "cpu": vectorised torch, "triton": the kernels under Triton's interpreter in a child
process) must give what the rule, written out per request below, gives."""

from __future__ import annotations

import math

import pytest
import torch

from tests.slots import compacted_slots
from tests.triton_interpreter import IN_CHILD, run_module_under_interpreter
from vllm_glimpse.engine.plan import GlimpseStepPlan, ImageSpan, PruneRequest
from vllm_glimpse.engine.prune_step import build_prune_batch, decide
from vllm_glimpse.glimpse.keep_rule import KeepRule, keep_mask

BACKENDS = ("triton", "torch", "cpu") if IN_CHILD else ("torch", "cpu")
BLOCK_SIZE = 8

if not IN_CHILD:

    def test_prune_step_under_interpreter():
        run_module_under_interpreter(__file__, "backends", min_passed=3)


def _batch():
    """(plan, rules, vip logits [T], number of rows in the step)."""
    # (images as (offset, h, w), prompt length P incl. the glimpse token, rule, block ids)
    specs = [
        ([(2, 3, 4), (16, 2, 2)], 25, KeepRule(), [7, 2, 9, 11]),  # two images, default rule
        ([(1, 1, 1)], 4, KeepRule(fixed_remain_ratio=0.5), [3]),  # a one-token image
        ([(3, 5, 5)], 30, KeepRule(max_remain_ratio=0.1, min_remain_num=3,
                                   anchor_positions=("tl", "br")), [0, 5, 6, 8]),  # ties, anchors
        ([(0, 4, 4)], 20, KeepRule(fixed_remain_ratio=0.25), [1, 4, 10]),  # non-finite VIP output
        ([(2, 2, 3)], 9, KeepRule(threshold=0.99, min_remain_num=None), [12, 13]),  # ends in image
    ]
    requests, row = [], 1  # row 0: a decode token of a request that does not prune
    for i, (images, P, _, blocks) in enumerate(specs):
        spans = [ImageSpan(o, h * w, (h, w)) for o, h, w in images]
        requests.append(PruneRequest(req_id=f"r{i}", batch_index=i + 1, row_start=row,
                                     num_prompt_tokens=P, images=spans, block_ids=blocks))
        row += P
    num_tokens = row + 2  # and two rows of a text-only prompt after them
    plan = GlimpseStepPlan(requests=requests, block_size=BLOCK_SIZE, switch_attention=None)
    gen = torch.Generator().manual_seed(0)
    logits = []
    for i, req in enumerate(requests):
        n = sum(s.length for s in req.images)
        # request 2: few distinct values, so ties across the top-k cut
        x = (torch.randint(-1, 2, (n,), generator=gen).float() if i == 2
             else torch.randn(n, generator=gen) * 2)
        if i == 3:
            x[5] = float("nan")
            x[7] = float("inf")
        logits.append(x)
    return plan, [s[2] for s in specs], torch.cat(logits), num_tokens


def _expected(plan, rules, logits):
    """Per request: (kept prompt rows, kept per image, non-finite), from keep_mask per request."""
    out, start = [], 0
    for req, rule in zip(plan.requests, rules):
        n = sum(s.length for s in req.images)
        x = logits[start:start + n]
        start += n
        nonfinite = not bool(torch.isfinite(x).all())
        if nonfinite:
            keep = torch.ones(n, dtype=torch.bool)
        else:
            grid = req.images[0].grid_hw if len(req.images) == 1 else None
            keep = keep_mask(x, threshold=rule.threshold, max_remain_ratio=rule.max_remain_ratio,
                             min_remain_num=rule.min_remain_num,
                             fixed_remain_ratio=rule.fixed_remain_ratio,
                             anchor_positions=rule.anchor_positions, grid_hw=grid)
        local = torch.ones(req.num_prompt_tokens - 1, dtype=torch.bool)  # glimpse row dropped
        index = torch.cat([torch.arange(s.offset, s.offset + s.length) for s in req.images])
        local[index] = keep
        local[-1] = True  # the last real token stays
        per_image = [int(local[s.offset:s.offset + s.length].sum()) for s in req.images]
        out.append((torch.nonzero(local).squeeze(-1), per_image, nonfinite))
    return out


def test_batch_exercises_what_it_claims():
    plan, rules, logits, _ = _batch()
    want = _expected(plan, rules, logits)
    assert want[3][2] and not any(w[2] for i, w in enumerate(want) if i != 3)
    assert want[3][1] == [16]  # non-finite: every image token kept despite fixed ratio 0.25
    assert want[1][1] == [1]  # one-token image, fixed ratio 0.5 -> clamp to 1
    assert len(want[0][1]) == 2  # two images, counted apart
    # ties: the top-k cut falls inside a run of equal logits
    x = logits[17:42]  # request 2 (after 16 + 1 image tokens)
    kept_vals = x[keep_mask(x, max_remain_ratio=0.1, min_remain_num=3)]
    assert bool((x[~keep_mask(x, max_remain_ratio=0.1, min_remain_num=3)] == kept_vals.min()).any())
    # anchors add tokens the rule alone would drop
    assert want[2][1][0] > 3
    # the last prompt ends in an image token, which stays though nothing passes 0.99
    assert want[4][1] == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decide_backends(backend):
    plan, rules, logits, num_tokens = _batch()
    batch = build_prune_batch(plan, rules, "cpu")
    got = decide(batch, logits, num_tokens, backend=backend)
    want = _expected(plan, rules, logits)
    keep_rows = torch.ones(num_tokens, dtype=torch.bool)
    moved, old, new = [], [], []
    for req, result, (rows, per_image, nonfinite), flag in zip(
            plan.requests, got.results, want, got.nonfinite):
        assert torch.equal(result.kept_rows, rows), (backend, req.req_id)
        assert result.kept_per_image == per_image, (backend, req.req_id)
        assert result.image_tokens_after == sum(per_image)
        assert result.image_tokens_before == sum(s.length for s in req.images)
        assert result.num_prompt_tokens == req.num_prompt_tokens
        assert flag == nonfinite
        span = slice(req.row_start, req.row_start + req.num_prompt_tokens)
        local = torch.zeros(req.num_prompt_tokens, dtype=torch.bool)
        local[rows] = True
        keep_rows[span] = local
        moved.append(rows + req.row_start)
        old.append(compacted_slots(req.block_ids, req.num_prompt_tokens, BLOCK_SIZE)[rows])
        new.append(compacted_slots(req.block_ids, rows.numel(), BLOCK_SIZE))
    assert torch.equal(got.keep_rows, keep_rows)
    assert torch.equal(got.survivors, torch.nonzero(keep_rows).squeeze(-1))
    assert torch.equal(got.moved_rows, torch.cat(moved))
    assert torch.equal(got.old_slots, torch.cat(old))
    assert torch.equal(got.new_slots, torch.cat(new))
    assert torch.equal(got.survivors[got.moved_survivor_index], got.moved_rows)


def test_anchors_on_a_two_image_request_are_refused():
    plan, rules, _, _ = _batch()
    rules[0] = KeepRule(anchor_positions=("tl",))
    with pytest.raises(ValueError, match="single-image"):
        build_prune_batch(plan, rules, "cpu")


def test_batch_tensors():
    plan, rules, _, _ = _batch()
    batch = build_prune_batch(plan, rules, "cpu")
    req = plan.requests[0]
    assert batch.glimpse_rows.tolist() == [r.glimpse_row for r in plan.requests]
    assert batch.image_positions[:16].tolist() == list(range(2, 14)) + list(range(16, 20))
    assert batch.image_slots[:16].tolist() == compacted_slots(
        req.block_ids, 25, BLOCK_SIZE)[batch.image_positions[:16]].tolist()
    assert batch.image_id.tolist()[:17] == [0] * 12 + [1] * 4 + [2]
    assert math.isnan(batch.max_remain_ratio[0]) and batch.max_remain_ratio[2] == 0.1
    assert batch.min_remain_num.tolist() == [1, 1, 3, 1, 0]
    assert batch.force_keep.sum() == 2  # the two anchors of request 2


def test_memory_profiling_holds_the_prune_step_reservation():
    """vLLM sizes the KV cache from the peak of the runner's profile_run, whose dummy batch never
    prunes: our runner holds the model's reservation for the prune step during it, and only then."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vllm_glimpse.engine.runner import GlimpseRunnerMixin

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.empty.memory_format:
                self.sizes.append(args[0])
            return func(*args, **(kwargs or {}))

    seen = []

    class Model:
        glimpse_enabled = True

        @staticmethod
        def glimpse_profile_reserve_bytes(num_tokens):
            return 3 * num_tokens

    class Base:
        def profile_run(self):
            seen.append(list(tracker.sizes))
            return "profiled"

    class Runner(GlimpseRunnerMixin, Base):
        max_num_tokens = 1000
        device = torch.device("meta")

        def get_model(self):
            return Model()

    tracker = Allocations()
    with tracker:
        assert Runner().profile_run() == "profiled"
    assert seen == [[[3000]]]


def test_reservation_covers_what_the_dummy_forward_does_not():
    """The reservation is the prune step's bound beyond the MLP activations the dummy forward
    already holds at every layer; with a cache that cannot be read back, at least the K/V of
    layers 0..K held across the step."""
    from types import SimpleNamespace

    from vllm_glimpse.glimpse import GlimpseConfig
    from vllm_glimpse.models.glimpse_lm import GlimpseModelMixin

    cfg = GlimpseConfig(family="qwen2_5_vl", hidden_size=3584, num_attention_heads=28,
                        num_hidden_layers=28, vision_hidden_size=1280, rms_norm_eps=1e-6,
                        selected_layers=(18,), reduce_layer=18, selected_visual_layers=(31, 23, 15, 7),
                        use_attention_logits=True)

    def model(impl_name, intermediate):
        impl = type(impl_name, (), {"kv_cache_dtype": "auto"})()
        attn = SimpleNamespace(impl=impl, num_kv_heads=4, head_size=128)
        text = SimpleNamespace(intermediate_size=intermediate, hidden_size=3584)
        lm = torch.nn.Linear(2, 2).to(torch.bfloat16)
        return SimpleNamespace(
            glimpse_enabled=True, glimpse_checkpoint=SimpleNamespace(config=cfg),
            __dict__={}, config=SimpleNamespace(get_text_config=lambda: text),
            _glimpse_text_model=lambda: lm,
        ), attn

    def reserve(impl_name, intermediate, tokens=10_000, longest_prompt=0, held_prompts=1):
        m, attn = model(impl_name, intermediate)
        m.__dict__["_glimpse_recorders"] = [SimpleNamespace(attn=attn)]
        m.__dict__["_glimpse_longest_prompt"] = longest_prompt
        m.__dict__["_glimpse_held_prompts"] = held_prompts
        return GlimpseModelMixin.glimpse_profile_reserve_bytes(m, tokens)

    # Qwen2.5-VL-7B's MLP (18944) holds far more than the prune step needs: nothing to add.
    assert reserve("FlashAttentionImpl", 18944) == 0
    # A model with a small MLP: the excess is reserved.
    assert reserve("FlashAttentionImpl", 64) > 0
    # Unreadable cache (any other backend): K and V of layers 0..K for every token, at least.
    assert reserve("TritonAttentionImpl", 18944) >= 19 * 10_000 * 2 * 4 * 128 * 2
    # Chunked prefill (a 2048-token step, prompts up to 32768 tokens): a whole prompt's held rows
    # (hidden state and residual, the four vision layers' conditions) and its prune step.
    held_rows = 32768 * (2 * 3584 + 4 * 1280) * 2
    # The prune step over 32768 tokens needs more than the 2048-token dummy forward's MLP holds.
    assert reserve("FlashAttentionImpl", 18944, 2048, 32768) > held_rows
    assert reserve("FlashAttentionImpl", 18944, 2048) == 0  # chunked prefill off: as before
    # ... and the held rows' survivors through layers K+1.. (hidden, residual, MLP), beyond the
    # step's own tokens, where the MLP dominates
    assert reserve("FlashAttentionImpl", 18944, 2048, 32768) >= (
        held_rows + 32768 * (2 * 3584 + 3 * 18944) * 2)
    # a long_prefill_token_threshold lets several prompts hold rows at once: each is reserved
    assert reserve("FlashAttentionImpl", 18944, 2048, 32768, held_prompts=4) >= 4 * held_rows
