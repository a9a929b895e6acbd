"""GlimpsePrune in an engine compiled as vLLM compiles by default (no ``enforce_eager``).

* the engine keeps vLLM's compilation settings: the same compilation mode and CUDA-graph mode
  as a vanilla engine built from the same arguments;
* greedy tokens equal the independent HF reference for the mixed batch (image prompts that
  prune, text-only prompts, decode steps, all in one batch);
* the tail blocks still return to the pool in the prune step;
* every step that prunes is dispatched eagerly (``CUDAGraphMode.NONE``, no padding), every
  other step as vLLM dispatches it: read from vLLM's own dispatch on the runner this run uses
  (V1: the ``CudagraphDispatcher``; MRv2: ``dispatch_cg_and_sync_dp``).

On this CPU a non-pruning step runs the ``torch.compile``d model and the dispatch is NONE either
way; what the test pins is that the prune step asks for eager dispatch, which on a GPU is what
keeps it out of CUDA graphs (tests/test_gpu.py runs the GPU case where a GPU is present).
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.config import CompilationMode

from vllm_glimpse.stats import STATS_KEY
from vllm_glimpse.testing.generate import make_llm, model_runner_kind, shutdown
from vllm_glimpse.testing.workloads import build_request, mixed_batch

MAX_TOKENS = 6
RATIO = 0.25


def _install_dispatch_spy(worker) -> None:
    """Record, per real step, whether it was dispatched eagerly and whether it pruned."""
    runner = worker.model_runner
    log: list[dict] = []
    runner.__dict__["_test_dispatch_log"] = log
    if model_runner_kind(worker) == "v2":
        import vllm.v1.worker.gpu.model_runner as mrv2

        original = mrv2.dispatch_cg_and_sync_dp

        def spy(*args, need_eager=False, **kwargs):
            log.append({"eager": bool(need_eager)})
            return original(*args, need_eager=need_eager, **kwargs)

        mrv2.dispatch_cg_and_sync_dp = spy
        runner.__dict__["_test_restore"] = lambda: setattr(mrv2, "dispatch_cg_and_sync_dp", original)
    else:
        dispatcher = runner.cudagraph_dispatcher
        original = dispatcher.dispatch

        def spy(*args, valid_modes=None, **kwargs):
            from vllm.config.compilation import CUDAGraphMode

            plan = runner.__dict__["_glimpse_runner_state"]["plan"] if \
                "_glimpse_runner_state" in runner.__dict__ else None
            log.append({"eager": valid_modes == {CUDAGraphMode.NONE}, "planned": plan is not None})
            return original(*args, valid_modes=valid_modes, **kwargs)

        dispatcher.dispatch = spy
        runner.__dict__["_test_restore"] = lambda: dispatcher.__dict__.pop("dispatch", None)


def _read_dispatch_log(worker) -> list[dict]:
    runner = worker.model_runner
    runner.__dict__.pop("_test_restore")()
    return runner.__dict__.pop("_test_dispatch_log")


@pytest.fixture(scope="module")
def compiled_run(tiny_models, glimpse_checkpoints):
    """One compiled GlimpsePrune engine (Qwen2.5-VL), the mixed batch through it."""
    family = "qwen2_5_vl"
    llm = make_llm(tiny_models[family], method="glimpse", enforce_eager=False,
                   knobs={"checkpoint": glimpse_checkpoints[family], "fixed_ratio": RATIO})
    try:
        config = llm.llm_engine.vllm_config
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        pool = sched.kv_cache_manager.block_pool
        total = pool.get_num_free_blocks()
        tokenizer = llm.get_tokenizer()
        specs = mixed_batch()
        prompts = [build_request(tokenizer, s) for s in specs]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        llm.collective_rpc(_install_dispatch_spy)
        # One step at a time, so that the prune step's free-block count can be read.
        for i, p in enumerate(prompts):
            llm.llm_engine.add_request(str(i), p, params)
        outputs, free_after_step, held_after_prefill = {}, [], None
        while llm.llm_engine.has_unfinished_requests():
            for out in llm.llm_engine.step():
                if out.finished:
                    outputs[int(out.request_id.split("-")[0])] = out
            free_after_step.append(pool.get_num_free_blocks())
            if held_after_prefill is None:  # what the running requests' lengths need
                bs = config.cache_config.block_size
                assert all(r.num_computed_tokens == r.num_prompt_tokens for r in sched.running)
                held_after_prefill = sum(-(-r.num_computed_tokens // bs) for r in sched.running)
        dispatch = llm.collective_rpc(_read_dispatch_log)[0]
        facts = dict(
            mode=config.compilation_config.mode,
            cudagraph_mode=config.compilation_config.cudagraph_mode,
            enforce_eager=config.model_config.enforce_eager,
            block_size=config.cache_config.block_size,
            runner=model_runner_kind(llm.llm_engine.engine_core.engine_core.model_executor
                                     .driver_worker.worker),
        )
    finally:
        shutdown(llm)
    yield dict(specs=specs, prompts=prompts, outputs=[outputs[i] for i in range(len(specs))],
               free_after_step=free_after_step, total=total, dispatch=dispatch,
               held_after_prefill=held_after_prefill, **facts)


def test_compiled_engine_keeps_vllms_compilation_settings(tiny_models, compiled_run):
    """The GlimpsePrune engine compiles exactly as vanilla vLLM does from the same arguments."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS

    args = dict(TINY_ENGINE_ARGS, enforce_eager=False)
    vanilla = EngineArgs(model=str(tiny_models["qwen2_5_vl"]), **args).create_engine_config()
    assert compiled_run["enforce_eager"] is False
    assert compiled_run["mode"] == vanilla.compilation_config.mode != CompilationMode.NONE
    assert compiled_run["cudagraph_mode"] == vanilla.compilation_config.cudagraph_mode


def test_compiled_engine_tokens_equal_reference(compiled_run, hf_glimpse):
    from vllm_glimpse.glimpse import KeepRule

    pruned = 0
    for spec, prompt, out in zip(compiled_run["specs"], compiled_run["prompts"],
                                 compiled_run["outputs"]):
        images = [img.build() for img in spec.images]
        want, _ = hf_glimpse["qwen2_5_vl"].generate(prompt["prompt"], images, MAX_TOKENS,
                                                    KeepRule(fixed_remain_ratio=RATIO))
        assert list(out.outputs[0].token_ids) == want.tokens, f"{spec}: tokens differ"
        stats = (out.kv_transfer_params or {}).get(STATS_KEY)
        if images:
            assert stats["image_tokens_after"] == int(want.keep.sum()) < int(want.keep.numel())
            pruned += 1
        else:
            assert stats is None
    assert pruned >= 2


def test_compiled_engine_frees_tail_blocks_in_the_prune_step(compiled_run):
    """Every request of the batch is prefilled (and the image ones pruned) in the first step:
    the pool then holds the blocks of the kept lengths, far fewer than the prompts'."""
    bs = compiled_run["block_size"]
    held = compiled_run["total"] - compiled_run["free_after_step"][0]
    assert held == compiled_run["held_after_prefill"]
    unpruned = sum(-(-(len(o.prompt_token_ids) + 1) // bs) for o in compiled_run["outputs"])
    assert held < unpruned
    assert compiled_run["free_after_step"][-1] == compiled_run["total"]


def test_prune_steps_are_dispatched_eagerly(compiled_run):
    dispatch = compiled_run["dispatch"]
    steps = len(compiled_run["free_after_step"])
    assert len(dispatch) == steps, dispatch  # one real dispatch per step
    # The first step prefills (and prunes) the batch; the rest decode.
    assert dispatch[0]["eager"] is True
    assert all(d["eager"] is False for d in dispatch[1:]), dispatch
    if compiled_run["runner"] == "v1":
        assert [d["planned"] for d in dispatch] == [True] + [False] * (steps - 1)
