"""GlimpsePrune inside the vLLM engine, on the tiny models with synthetic checkpoints.

* greedy tokens of vLLM + plugin equal the independent HF reference (tests/reference/
  glimpse_hf.py) for the mixed batch (several image sizes, a two-image prompt, text-only
  prompts), with a forced keep ratio and with the checkpoint's own threshold rule;
* the per-request stats in ``RequestOutput.kv_transfer_params["vllm_glimpse"]`` equal the
  reference's kept counts;
* the scheduler's free-block count after the prefill step is total - sum(cdiv(kept length,
  block size)) and returns to total when every request has finished.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig
from vllm import SamplingParams

from vllm_glimpse.glimpse import KeepRule
from vllm_glimpse.settings import LOGGER_NAME
from vllm_glimpse.stats import STATS_KEY
from vllm_glimpse.testing.generate import make_llm, shutdown
from vllm_glimpse.testing.glimpse_checkpoints import write_tiny_checkpoint
from vllm_glimpse.testing.workloads import ImageSpec, RequestSpec, build_request, mixed_batch

MAX_TOKENS = 6
FAMILIES = ["qwen2_5_vl", "llava"]


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


# Keep rules: a forced ratio, and the checkpoint's own (threshold 0.5, at least 1 token); then,
# per request index of mixed_batch(), a request's own knobs (mm_processor_kwargs) and the rule
# they make over the engine's: a threshold-mode knob replaces the engine's fixed ratio, a fixed
# ratio replaces the threshold mode, unset knobs stay the engine's.
RULES = {
    "fixed_0.25": ({"fixed_ratio": 0.25}, KeepRule(fixed_remain_ratio=0.25), {
        1: ({"glimpse_threshold": 0.5}, KeepRule(threshold=0.5, min_remain_num=1)),
        4: ({"glimpse_fixed_ratio": 0.6}, KeepRule(fixed_remain_ratio=0.6)),
    }),
    "threshold": ({}, None, {
        1: ({"glimpse_fixed_ratio": 0.5}, KeepRule(fixed_remain_ratio=0.5)),
        2: ({"glimpse_max_ratio": 0.1, "glimpse_min_keep": 3},
            KeepRule(threshold=0.5, max_remain_ratio=0.1, min_remain_num=3)),
    }),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", list(RULES))
def test_greedy_tokens_and_stats_equal_reference(tiny_models, glimpse_checkpoints, hf_glimpse, family,
                                                 rule):
    knobs, keep_rule, per_request = RULES[rule]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    llm = make_llm(tiny_models[family], method="glimpse",
                   knobs={"checkpoint": glimpse_checkpoints[family], **knobs})
    # (after the engine starts: vLLM's logging setup resets loggers under "vllm")
    ours = logging.getLogger(LOGGER_NAME)
    level = ours.level
    ours.setLevel(logging.INFO)  # the tests run vLLM at WARNING (conftest)
    ours.addHandler(handler)
    try:
        tokenizer = llm.get_tokenizer()
        specs = mixed_batch()
        prompts = [build_request(tokenizer, s) for s in specs]
        for i, (mm_kwargs, _) in per_request.items():
            prompts[i]["mm_processor_kwargs"] = mm_kwargs
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        shutdown(llm)
        ours.removeHandler(handler)
        ours.setLevel(level)
    logged = [r.getMessage() for r in records]
    pruned_somewhere = False
    for i, (spec, prompt, out) in enumerate(zip(specs, prompts, outputs)):
        images = [img.build() for img in spec.images]
        request_rule = per_request[i][1] if i in per_request else keep_rule
        want, prepared = hf_glimpse[family].generate(prompt["prompt"], images, MAX_TOKENS, request_rule)
        assert list(out.outputs[0].token_ids) == want.tokens, f"{spec}: tokens differ from the reference"
        # the caller's prompt (as HF's processor expands it), without the appended glimpse token
        assert list(out.prompt_token_ids) == prepared.input_ids.tolist(), spec
        stats = (out.kv_transfer_params or {}).get(STATS_KEY)
        if not images:
            assert stats is None  # text-only requests are untouched
            continue
        num_image_tokens = int(want.keep.numel())
        assert stats["image_tokens_before"] == num_image_tokens
        assert stats["image_tokens_per_image_after"] == want.kept_per_image
        assert stats["image_tokens_after"] == int(want.keep.sum())
        assert stats["prompt_tokens_after"] == int(want.survivor_index.numel())
        pruned_somewhere |= stats["image_tokens_after"] < num_image_tokens
        line = (f"kept {stats['image_tokens_after']} of {num_image_tokens} image tokens (prompt "
                f"{stats['prompt_tokens_before']} -> {stats['prompt_tokens_after']} tokens)")
        assert any(line in m for m in logged), line
    assert pruned_somewhere


def _expected_blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_tail_blocks_return_to_the_pool_in_the_prefill_step(tiny_models, glimpse_checkpoints, family):
    llm = make_llm(tiny_models[family], method="glimpse",
                   knobs={"checkpoint": glimpse_checkpoints[family], "fixed_ratio": 0.1}, block_size=32)
    try:
        engine = llm.llm_engine
        scheduler = _scheduler(llm)
        pool = scheduler.kv_cache_manager.block_pool
        block_size = scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        assert block_size == 32
        total = pool.get_num_free_blocks()
        tokenizer = llm.get_tokenizer()
        specs = mixed_batch()
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        for i, spec in enumerate(specs):
            engine.add_request(str(i), build_request(tokenizer, spec), params)
        engine.step()  # the prefill step: every prompt fits, every image request prunes
        running = {r.request_id: r for r in scheduler.running}
        assert len(running) == len(specs)
        lengths = {}
        for req_id, request in running.items():
            assert request.num_computed_tokens == request.num_prompt_tokens
            lengths[req_id] = request.num_computed_tokens
            if specs[int(req_id.split("-")[0])].images:
                assert not request.mm_features  # pruned: its images are consumed
                assert req_id in scheduler.glimpse_originals
        held = sum(_expected_blocks(n, block_size) for n in lengths.values())
        assert pool.get_num_free_blocks() == total - held
        # and far fewer than the unpruned prompts would hold
        originals = scheduler.glimpse_originals
        unpruned = sum(_expected_blocks(len(originals[r][0]) if r in originals else n, block_size)
                       for r, n in lengths.items())
        assert held < unpruned
        while engine.has_unfinished_requests():
            engine.step()
        assert pool.get_num_free_blocks() == total
        assert not scheduler.glimpse_originals and not scheduler.pending_stats
    finally:
        shutdown(llm)


def _run_alone(llm, requests, params):
    """Each request on its own in the engine: {request id: tokens}."""
    engine = llm.llm_engine
    out = {}
    for req_id, prompt in requests:
        engine.add_request(req_id, prompt, params[req_id])
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = list(o.outputs[0].token_ids)
    return out


@pytest.mark.parametrize("family, num_requests", [("qwen2_5_vl", 200), ("llava", 60)])
def test_many_requests_with_aborts_and_preemption(tiny_models, glimpse_checkpoints, family, num_requests):
    """200 mixed requests (60 on LLaVA, whose prompts are longer) through a small KV cache, with
    forced preemption of every running request at three steps (vLLM's
    ``reset_prefix_cache(reset_running_requests=True)``): pruned requests are recomputed from
    their original prompt; some requests are aborted while waiting or running. Every other
    request gives the tokens it gives alone, and no block leaks."""
    specs = mixed_batch()
    knobs = {"checkpoint": glimpse_checkpoints[family], "fixed_ratio": 0.25}
    # the longest prompt fits (LLaVA: 576 tokens per image), and barely more
    max_len = {"qwen2_5_vl": 512, "llava": 1280}[family]
    small = make_llm(tiny_models[family], method="glimpse", knobs=knobs, block_size=32,
                     num_gpu_blocks_override=max_len // 32 + 1, max_num_seqs=48, max_model_len=max_len)
    try:
        tokenizer = small.get_tokenizer()
        requests, params = [], {}
        for i in range(num_requests):
            spec = specs[i % len(specs)]
            req_id = f"r{i}"
            requests.append((req_id, build_request(tokenizer, spec)))
            params[req_id] = SamplingParams(temperature=0.0, max_tokens=3 + (i * 5) % 10, ignore_eos=True)
        aborted = {f"r{i}" for i in range(3, num_requests, 9)}
        engine = small.llm_engine
        scheduler = _scheduler(small)
        pool = scheduler.kv_cache_manager.block_pool
        total = pool.get_num_free_blocks()
        preempted = {"all": 0, "pruned": 0}
        original_preempt = scheduler._preempt_request

        def counting_preempt(request, *args, **kwargs):
            preempted["all"] += 1
            preempted["pruned"] += request.request_id in scheduler.glimpse_originals
            return original_preempt(request, *args, **kwargs)

        scheduler._preempt_request = counting_preempt
        for req_id, prompt in requests:
            engine.add_request(req_id, prompt, params[req_id])
        finished, steps = {}, 0
        while engine.has_unfinished_requests():
            steps += 1
            if steps == 5:  # some of these are running, some still waiting
                engine.abort_request(sorted(aborted))
            if steps in (8, 16, 30):  # forced preemption of everything running (vLLM's own)
                scheduler.reset_prefix_cache(reset_running_requests=True)
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = list(o.outputs[0].token_ids)
        assert preempted["pruned"] > 0, preempted
        assert pool.get_num_free_blocks() == total  # no leaked blocks
        assert not scheduler.glimpse_originals and not scheduler.pending_stats
    finally:
        shutdown(small)
    kept = [(r, p) for r, p in requests if r not in aborted]
    assert set(finished) == {r for r, _ in kept}
    big = make_llm(tiny_models[family], method="glimpse", knobs=knobs, block_size=32, max_model_len=max_len)
    try:
        alone = _run_alone(big, kept, params)
    finally:
        shutdown(big)
    differing = [r for r, _ in kept if finished[r] != alone[r]]
    assert not differing, f"{len(differing)} requests differ from their run alone: {differing[:5]}"


def test_non_finite_vip_output_keeps_every_image_token(tiny_models, tmp_path):
    """A checkpoint whose VIP outputs NaN: the engine does not crash; image requests keep all
    their image tokens (stats say so), and the batch's text-only requests are served."""
    path = tiny_models["qwen2_5_vl"]
    ckpt = write_tiny_checkpoint(tmp_path / "nan", "qwen2_5_vl", AutoConfig.from_pretrained(path))
    state = torch.load(ckpt / "new_modules_gp.pt")
    out_proj = [k for k in state["attn_fuser"] if k.startswith("attn_out_projs.") and k.endswith("bias")]
    state["attn_fuser"][out_proj[0]].fill_(float("nan"))
    torch.save(state, ckpt / "new_modules_gp.pt")
    llm = make_llm(path, method="glimpse", knobs={"checkpoint": str(ckpt)})
    try:
        tokenizer = llm.get_tokenizer()
        specs = mixed_batch()
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        outputs = llm.generate([build_request(tokenizer, s) for s in specs], params, use_tqdm=False)
    finally:
        shutdown(llm)
    for spec, out in zip(specs, outputs):
        assert len(out.outputs[0].token_ids) == 3
        if spec.images:
            stats = out.kv_transfer_params[STATS_KEY]
            assert stats["image_tokens_after"] == stats["image_tokens_before"]


def test_prompts_longer_than_the_step_budget_are_served_in_chunks(tiny_models, glimpse_checkpoints):
    """--max-num-batched-tokens below a prompt's length (vLLM's chunked prefill, on by default):
    the prompt, with an image or text only, is computed in chunks and served (an image request
    pruned, with the counts a prompt within the budget gets)."""
    llm = make_llm(tiny_models["qwen2_5_vl"], method="glimpse",
                   knobs={"checkpoint": glimpse_checkpoints["qwen2_5_vl"], "fixed_ratio": 0.25},
                   max_num_batched_tokens=200, max_num_seqs=8)
    try:
        sched = llm.llm_engine.vllm_config.scheduler_config
        assert sched.max_num_batched_tokens == 200 and sched.enable_chunked_prefill
        tokenizer = llm.get_tokenizer()
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        big_image = RequestSpec("Describe.", (ImageSpec("checker", 448, 448, 1),))  # 16 x 16 tokens
        small_image = RequestSpec("Describe.", (ImageSpec("checker", 224, 224, 2),))  # 8 x 8 tokens
        prompts = [build_request(tokenizer, big_image), {"prompt_token_ids": [100] * 401},
                   build_request(tokenizer, small_image)]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert len(outs[0].prompt_token_ids) > 200
        for out in outs:
            assert len(out.outputs[0].token_ids) == 4
        stats = [outs[i].kv_transfer_params[STATS_KEY] for i in (0, 2)]
        assert [(s["image_tokens_before"], s["image_tokens_after"]) for s in stats] == [
            (256, 64), (64, 16)]
        assert not (outs[1].kv_transfer_params or {}).get(STATS_KEY)
    finally:
        shutdown(llm)
