"""GlimpsePrune with vLLM's chunked prefill on (its default), prompts longer than the step budget.

* every prompt of a mixed batch (image prompts several times the step budget, short image
  prompts, text-only prompts) is served, computed in chunks, and its greedy tokens and kept
  counts equal the independent HF reference, which computes each prompt in one pass;
* the chunk boundaries fall in the text before an image, inside an image and between an image
  and the glimpse token: every request is run at several step budgets;
* the prune happens in the step that computes the glimpse token: in that step the request's
  blocks drop to what its survivors need (read from the scheduler's own block pool), and the
  pool is whole again at the end;
* a request preempted while its chunks wait for the glimpse token is recomputed and still
  equals the reference.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from vllm_glimpse.glimpse import KeepRule
from vllm_glimpse.stats import STATS_KEY
from vllm_glimpse.testing.generate import make_llm, shutdown
from vllm_glimpse.testing.workloads import ImageSpec, RequestSpec, build_request

MAX_TOKENS = 5
RATIO = 0.25
BLOCK = 32
#: step budgets (tokens): each puts the chunk boundaries of the requests below elsewhere
BUDGETS = (64, 97)

SPECS = (
    RequestSpec("What colour is the square in the top left corner?",
                (ImageSpec("checker", 448, 448, 1),)),
    RequestSpec("Write one sentence about the sea."),
    RequestSpec("Compare the two pictures in a few words, naming their main colours and shapes.",
                (ImageSpec("stripes", 336, 336, 2), ImageSpec("gradient", 280, 280, 3))),
    RequestSpec("Describe it.", (ImageSpec("checker", 112, 112, 4),)),
)


def _engine(tiny_models, glimpse_checkpoints, family: str, budget: int, **extra):
    return make_llm(tiny_models[family], method="glimpse", block_size=BLOCK,
                    max_num_batched_tokens=budget, max_num_seqs=4,
                    knobs={"checkpoint": glimpse_checkpoints[family], "fixed_ratio": RATIO},
                    **extra)


def _run_steps(llm, prompts, before_step=None):
    """Run the prompts step by step (``before_step(n)`` before step n); returns the outputs in
    order and, per request, the number of KV blocks it held after each step (from the
    scheduler's KV cache manager)."""
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs, blocks = {}, {i: [] for i in range(len(prompts))}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        if before_step is not None:
            before_step(steps)
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id.split("-")[0])] = out
        for req_id, held in manager.req_to_blocks.items():
            blocks[int(req_id.split("-")[0])].append(len(held))
    return [outputs[i] for i in range(len(prompts))], blocks


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_chunked_prefill_equals_the_reference(family, tiny_models, glimpse_checkpoints, hf_glimpse):
    rule = KeepRule(fixed_remain_ratio=RATIO)
    wants = None
    for budget in BUDGETS:
        llm = _engine(tiny_models, glimpse_checkpoints, family, budget)
        try:
            sched_config = llm.llm_engine.vllm_config.scheduler_config
            assert sched_config.enable_chunked_prefill is True
            assert sched_config.max_num_batched_tokens == budget
            pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
            total = pool.get_num_free_blocks()
            tokenizer = llm.get_tokenizer()
            prompts = [build_request(tokenizer, s) for s in SPECS]
            outs, blocks = _run_steps(llm, prompts)
            assert pool.get_num_free_blocks() == total
        finally:
            shutdown(llm)
        if wants is None:
            wants = [hf_glimpse[family].generate(p["prompt"], [i.build() for i in s.images],
                                                 MAX_TOKENS, rule)[0]
                     for s, p in zip(SPECS, prompts)]
        long_prompts = 0
        for spec, out, want, held in zip(SPECS, outs, wants, blocks.values()):
            assert list(out.outputs[0].token_ids) == want.tokens, f"{family} {budget} {spec}"
            if not spec.images:
                continue
            stats = out.kv_transfer_params[STATS_KEY]
            assert stats["image_tokens_after"] == int(want.keep.sum()) < stats["image_tokens_before"]
            n = len(out.prompt_token_ids)
            if n > budget:
                long_prompts += 1
                # chunks grew the request's blocks step after step; the step that computed the
                # glimpse token cut them to what the survivors need (the prompt's first drop)
                drop = next(k for k in range(1, len(held)) if held[k] < held[k - 1])
                assert drop >= 2 and held[:drop] == sorted(held[:drop]), held
                assert held[drop] == -(-stats["prompt_tokens_after"] // BLOCK), (held, stats)
        assert long_prompts >= 2


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_preempted_while_chunks_are_held(family, tiny_models, glimpse_checkpoints, hf_glimpse):
    """vLLM preempts every running request (its own ``reset_prefix_cache(reset_running_requests=
    True)``) while their prefills are part-way, chunks held for the glimpse token: each is
    recomputed from the start, equals the reference, and no block leaks. A preempted request
    that waits keeps nothing held in the model: only running requests hold rows."""
    llm = _engine(tiny_models, glimpse_checkpoints, family, 97)
    try:
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        pool = sched.kv_cache_manager.block_pool
        total = pool.get_num_free_blocks()
        preempted = []
        original = sched._preempt_request

        def spy(request, *args, **kwargs):
            preempted.append((request.num_computed_tokens, request.num_prompt_tokens,
                              min((f.mm_position.offset for f in request.mm_features), default=None)))
            return original(request, *args, **kwargs)

        sched._preempt_request = spy

        held_while_waiting, resets = [], []

        def preempt_all(step):
            held = set().union(*llm.collective_rpc(_held_request_ids))
            running = {r.request_id for r in sched.running}
            held_while_waiting.extend(held - running)
            # preempt when some request holds chunks beside another running one: the step
            # budget then resumes one of them and the other waits
            if held and len(running) > 1 and len(resets) < 2:
                resets.append(step)
                sched.reset_prefix_cache(reset_running_requests=True)

        tokenizer = llm.get_tokenizer()
        specs = [SPECS[0], SPECS[2]]
        prompts = [build_request(tokenizer, s) for s in specs]
        outs, _ = _run_steps(llm, prompts, preempt_all)
        assert pool.get_num_free_blocks() == total
    finally:
        shutdown(llm)
    assert resets and not held_while_waiting, (resets, held_while_waiting)
    # requests were preempted with chunks past their first image computed, not yet pruned
    assert any(first is not None and first < computed < prompt
               for computed, prompt, first in preempted), preempted
    _assert_equals_reference(hf_glimpse[family], specs, prompts, outs)


def _assert_equals_reference(reference, specs, prompts, outs) -> None:
    """Each request's greedy tokens are the HF reference's at the tests' keep ratio."""
    rule = KeepRule(fixed_remain_ratio=RATIO)
    for spec, prompt, out in zip(specs, prompts, outs):
        want, _ = reference.generate(prompt["prompt"], [i.build() for i in spec.images],
                                     MAX_TOKENS, rule)
        assert list(out.outputs[0].token_ids) == want.tokens, spec


def _glimpse_model(worker):
    runner = worker.model_runner
    return runner.model if hasattr(runner, "model_state") else runner.get_model()


def _held_request_ids(worker) -> set[str]:
    """The requests whose earlier chunks the model holds for their glimpse token."""
    return set(_glimpse_model(worker).__dict__["_glimpse_held"])


def _force_unreadable_cache(worker) -> None:
    """Make the prune step treat layers 0..K's cache as one it cannot read back (any attention
    backend but FlashAttention and vLLM's CPU one, or a quantized cache): it then keeps the
    K/V of the step's tokens, and of held chunks, while they run."""
    for kv in _glimpse_model(worker)._glimpse_layers_kv(BLOCK):
        kv.unreadable = "forced by the test"


def test_chunks_with_a_cache_that_cannot_be_read_back(tiny_models, glimpse_checkpoints, hf_glimpse):
    """Qwen2.5-VL (glimpse scores over the image keys): with the cache unreadable, the image
    tokens' K/V of earlier chunks are held with their rows, and the tokens equal the reference."""
    family = "qwen2_5_vl"
    llm = _engine(tiny_models, glimpse_checkpoints, family, 64)
    try:
        llm.collective_rpc(_force_unreadable_cache)
        tokenizer = llm.get_tokenizer()
        prompts = [build_request(tokenizer, s) for s in SPECS]
        outs, _ = _run_steps(llm, prompts)
    finally:
        shutdown(llm)
    _assert_equals_reference(hf_glimpse[family], SPECS, prompts, outs)


def test_llava_refuses_a_cache_it_cannot_read_back(tiny_models, glimpse_checkpoints, hf_glimpse,
                                                   monkeypatch):
    """LLaVA's glimpse scores need the keys of every prompt token, including tokens from the
    prefix cache and earlier chunks, which only the paged cache has: an engine whose cache cannot
    be read back (here forced; on a GPU, any attention backend but FlashAttention) is refused at
    start-up in one line naming the fix, and with both features off it serves the reference's
    tokens from the keys it records while the step runs."""
    from vllm_glimpse.engine import kv as kv_module

    monkeypatch.setattr(kv_module, "cpu_block_layout", lambda attn, block_size: "forced")
    monkeypatch.setattr(kv_module, "flash_attention_views", lambda attn: None)
    family = "llava"
    with pytest.raises(Exception, match=(
            r"GlimpsePrune on LLaVA with prefix caching and chunked prefill reads every prompt "
            r"key back from the paged KV cache, which this engine's cannot give back \(forced\)")):
        _engine(tiny_models, glimpse_checkpoints, family, 64)
    llm = _engine(tiny_models, glimpse_checkpoints, family, 4096, enable_prefix_caching=False,
                  enable_chunked_prefill=False, max_model_len=4096)
    try:
        tokenizer = llm.get_tokenizer()
        prompts = [build_request(tokenizer, s) for s in SPECS]
        outs, _ = _run_steps(llm, prompts)
    finally:
        shutdown(llm)
    _assert_equals_reference(hf_glimpse[family], SPECS, prompts, outs)
