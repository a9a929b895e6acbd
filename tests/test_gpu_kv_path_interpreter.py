"""The prune step's FlashAttention path (vllm_glimpse/engine/kv.py, engine/prune_step.py) through
the exact calls the engine makes (models/glimpse_lm.py): ``PagedKV`` on a layer,
``glimpse_layer_logits`` for the scores, ``decide`` then ``move_kv`` for the survivors' K/V. On a
GPU these run Triton kernels on vLLM 0.32 FlashAttention's cache; here the same kernels run under
Triton's interpreter on CPU tensors (a child pytest with TRITON_INTERPRET=1), on stand-in
FlashAttention layers shaped as the engine sees them.

Checked: the FlashAttention views are taken and the Triton kernels launched (not the CPU
backend's packed-block path nor the torch fallbacks); the scores equal
``glimpse_attention_scores`` on the same keys; after the move each survivor's K/V of both layers
sit at its compacted slot (also where that slot was another survivor's old one) and every other
slot is unchanged."""

from __future__ import annotations

import types

import pytest
import torch

from tests.triton_interpreter import IN_CHILD, run_module_under_interpreter

BLOCK_SIZE = 4
NUM_BLOCKS = 12
NUM_KV_HEADS = 2
NUM_HEADS = 4  # GQA: two query heads per KV head
HEAD_SIZE = 32
NUM_LAYERS = 2  # layers 0..K with K = 1

if not IN_CHILD:

    def test_flash_attention_path_under_interpreter():
        run_module_under_interpreter(__file__, "interpreter_path", min_passed=3)

else:
    from vllm_glimpse.engine.kv import AttentionRecorder, PagedKV, move_kv
    from vllm_glimpse.engine.plan import GlimpseStepPlan, ImageSpan, PruneRequest
    from vllm_glimpse.engine.prune_step import build_prune_batch, decide, glimpse_layer_logits
    from vllm_glimpse.glimpse.keep_rule import KeepRule
    from vllm_glimpse.glimpse.modules import glimpse_attention_scores
    from vllm_glimpse.kernels import glimpse_triton, kv_compaction_triton

    class FlashAttentionImpl:
        """Stand-in for vLLM 0.32's ``v1.attention.backends.flash_attn.FlashAttentionImpl``: the
        engine recognises the backend by this class name and reads these two attributes."""

        def __init__(self, scale: float) -> None:
            self.kv_cache_dtype = "auto"
            self.scale = scale

    def _layer(cache: torch.Tensor):
        """An attention layer as the engine reads it (``vllm.attention.layer.Attention``'s
        attributes the prune step touches)."""
        layer = types.SimpleNamespace(
            impl=FlashAttentionImpl(HEAD_SIZE ** -0.5), kv_cache=cache, num_kv_heads=NUM_KV_HEADS,
            head_size=HEAD_SIZE, head_size_v=HEAD_SIZE, num_heads=NUM_HEADS)
        layer.forward = lambda query, key, value, *args, **kwargs: None
        return layer

    def _plan():
        """Two requests with images (the second with two images), their blocks out of order."""
        # request 0: P = 14 (glimpse token last), one 2x3 image at rows 2..7
        # request 1: P = 11, a 2x2 image at rows 1..4 and a 1x3 image at rows 6..8
        requests = [
            PruneRequest(req_id="a", batch_index=0, row_start=0, num_prompt_tokens=14,
                         images=[ImageSpan(2, 6, (2, 3))], block_ids=[5, 1, 8, 3]),
            PruneRequest(req_id="b", batch_index=1, row_start=14, num_prompt_tokens=11,
                         images=[ImageSpan(1, 4, (2, 2)), ImageSpan(6, 3, (1, 3))],
                         block_ids=[2, 9, 0]),
        ]
        return GlimpseStepPlan(requests=requests, block_size=BLOCK_SIZE, switch_attention=None)

    def _filled_layers(batch, num_tokens, seed):
        """Per layer: (stand-in layer, the step's keys [rows, kv_heads, D], values). The cache is
        vLLM 0.32 FlashAttention's ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
        (``FlashAttentionImpl.do_kv_cache_update`` splits it as ``kv_cache.transpose(1, 2)
        .split(head_size, -1)`` into K and V); random elsewhere, each prompt token's K/V written
        at its original slot, as layers 0..K leave it in the step that prunes."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(NUM_LAYERS):
            cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE, generator=g)
            keys = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=g)
            values = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=g)
            for b in range(batch.num_requests):
                start = int(batch.row_starts[b])
                for p, slot in enumerate(batch.prompt_slots(b, "cpu").tolist()):
                    block, row = divmod(slot, BLOCK_SIZE)
                    cache[block, :, row, :HEAD_SIZE] = keys[start + p]
                    cache[block, :, row, HEAD_SIZE:] = values[start + p]
            out.append((_layer(cache), keys, values))
        return out

    @pytest.fixture
    def launches(monkeypatch):
        """Counts the Triton kernel launches, and runs the launchers' default backend on the
        Triton kernels: the engine calls them with ``backend="auto"``, which picks Triton on CUDA
        tensors and the vectorised torch path on CPU ones even under the interpreter."""
        count = {}

        def count_kernel(module, name):
            kernel = getattr(module, name)

            class Counted:
                def __getitem__(self, grid):
                    count[name] = count.get(name, 0) + 1
                    return kernel[grid]

            monkeypatch.setattr(module, name, Counted())

        def on_triton(module, name):
            launcher = getattr(module, name)

            def call(*args, **kwargs):
                assert "backend" not in kwargs  # the engine's call: the default, "auto"
                return launcher(*args, backend="triton", **kwargs)

            monkeypatch.setattr(module, name, call)

        assert glimpse_triton.INTERPRETED and kv_compaction_triton.INTERPRETED
        count_kernel(glimpse_triton, "_glimpse_logits_kernel")
        count_kernel(glimpse_triton, "_sequence_lse_kernel")
        count_kernel(kv_compaction_triton, "_scatter_kv_kernel")
        on_triton(glimpse_triton, "glimpse_attention_logits")
        on_triton(kv_compaction_triton, "scatter_kv_to_slots")
        return count

    @pytest.mark.parametrize("use_attention_logits", [True, False], ids=["qwen", "llava"])
    def test_interpreter_path_scores(launches, use_attention_logits):
        plan = _plan()
        num_tokens = sum(r.num_prompt_tokens for r in plan.requests)
        batch = build_prune_batch(plan, [KeepRule()] * 2, "cpu")
        layers = _filled_layers(batch, num_tokens, seed=0)
        queries = torch.randn(batch.num_requests, NUM_HEADS, HEAD_SIZE,
                              generator=torch.Generator().manual_seed(1))
        for attn, keys, _ in layers:
            kv = PagedKV(attn, BLOCK_SIZE)  # as models/glimpse_lm.py builds it
            assert kv.views is not None and kv.layout is None and kv.readable
            # as GlimpseLM._glimpse_layer_logits calls it on a readable cache
            got = glimpse_layer_logits(batch, queries, kv, scale=attn.impl.scale,
                                       use_attention_logits=use_attention_logits,
                                       recorded_keys=None)
            want = []
            for b, req in enumerate(plan.requests):
                start, P = req.row_start, req.num_prompt_tokens
                image = torch.cat([torch.arange(s.offset, s.offset + s.length)
                                   for s in req.images])
                if use_attention_logits:  # raw logits over the image keys
                    want.append(glimpse_attention_scores(
                        queries[b], keys[start + image], torch.arange(image.numel()),
                        use_attention_logits=True))
                else:  # log-softmax over the whole prompt, then the image columns
                    want.append(glimpse_attention_scores(
                        queries[b], keys[start:start + P], image, use_attention_logits=False))
            want = torch.cat(want)
            assert got.shape == want.shape == (batch.num_image_tokens, NUM_HEADS)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert launches.get("_glimpse_logits_kernel") == NUM_LAYERS
        assert launches.get("_sequence_lse_kernel", 0) == (0 if use_attention_logits
                                                            else NUM_LAYERS)

    def test_interpreter_path_move(launches):
        plan = _plan()
        num_tokens = sum(r.num_prompt_tokens for r in plan.requests)
        rules = [KeepRule(fixed_remain_ratio=0.5)] * 2
        batch = build_prune_batch(plan, rules, "cpu")
        layers = _filled_layers(batch, num_tokens, seed=2)
        # VIP logits chosen so that image rows 2 and 5 of request 0 go, rows 3, 4 and 6 stay:
        # row 4 then moves to row 3's old slot, which row 3 (a survivor) leaves for row 2's.
        vip_logits = torch.tensor([-5.0, 3.0, 2.0, -4.0, 1.0, -3.0,  # request 0
                                   -1.0, 4.0, 2.5, -2.0, 0.5, 3.5, -6.0])  # request 1
        decision = decide(batch, vip_logits, num_tokens)
        kept_a = decision.results[0].kept_rows.tolist()
        assert kept_a == [0, 1, 3, 4, 6, 8, 9, 10, 11, 12]
        old, new = decision.old_slots.tolist(), decision.new_slots.tolist()
        moved = [i for i in range(len(old)) if old[i] != new[i]]
        assert set(new[i] for i in moved) & set(old)  # a new slot that was a survivor's old one

        paged = [PagedKV(attn, BLOCK_SIZE) for attn, _, _ in layers]
        assert all(kv.views is not None for kv in paged)
        recorders = [AttentionRecorder(attn) for attn, _, _ in layers]
        before = [attn.kv_cache.clone() for attn, _, _ in layers]
        # as GlimpseLM._glimpse_forward calls it
        move_kv(paged, recorders, decision.old_slots, decision.new_slots, decision.moved_rows)
        assert launches.get("_scatter_kv_kernel") == NUM_LAYERS

        rows = decision.moved_rows.tolist()
        for (attn, keys, values), cache_before in zip(layers, before):
            want = cache_before.clone()
            for row, slot in zip(rows, new):
                block, r = divmod(slot, BLOCK_SIZE)
                want[block, :, r, :HEAD_SIZE] = keys[row]
                want[block, :, r, HEAD_SIZE:] = values[row]
            # each survivor's K/V at its compacted slot; every other slot as it was
            assert torch.equal(attn.kv_cache, want)
