"""Both methods on a CUDA GPU with a CUDA build of vLLM 0.32: ``pytest -m gpu``.

Skipped (every test, with the reason) unless torch sees a CUDA device and vLLM's platform is
CUDA. The engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` from conftest, the
``uni`` executor, tensor parallel size 1), so the tests can read the scheduler's block pool and
count the Triton kernel launches the model makes.

What differs from the CPU engine, and what each test pins down:

* Attention backend by dtype. vLLM's FlashAttention (and FlashInfer) take float16/bfloat16
  only, so a float32 engine runs another backend (Triton attention on the GPUs vLLM ranks):
  GlimpsePrune then reads the survivors' K/V back from the paged cache through the layout it
  probes from the backend's own cache writer and scores them with torch. In float16/bfloat16
  with FlashAttention and an unquantized cache, it scores the glimpse query straight from the
  paged cache and moves K/V with our Triton kernels.
* Model runner: on CUDA vLLM picks Model Runner V2 for these models, and so do our engines.
  Every engine here checks both (vLLM's ``use_v2_model_runner`` and the runner the worker built:
  MRv2's, ours for GlimpsePrune, with our ``ModelState`` where the method needs one).
* Float32 precision: CUDA may compute float32 matmuls and convolutions in TF32 (about 10
  mantissa bits: float16-level error, enough to change greedy tokens of the tiny random models),
  and Triton's ``tl.dot`` uses TF32 for float32 by default. The module fixture pins IEEE float32
  (cuBLAS, cuDNN, ``TRITON_F32_DEFAULT=ieee``) so the float32 engines are compared with the
  float32 HF references exactly, as on the CPU.

The HF references run on the CPU: they are the very calls the CPU tests make (and build their
index tensors on the CPU), so the GPU engine is compared with the same oracle as the CPU engine.
"""

from __future__ import annotations

import pytest
import torch


def _missing_for_gpu() -> str | None:
    """Why these tests cannot run here (None: they can)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA device (torch.cuda.is_available() is False)")
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        missing.append(f"vLLM ({exc})")
    else:
        if not current_platform.is_cuda():
            missing.append("a CUDA build of vLLM (this vLLM's platform is "
                           f"{current_platform.device_type or 'unspecified'!r})")
    return "needs " + " and ".join(missing) if missing else None


MISSING = _missing_for_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

MAX_TOKENS = 8
FAMILIES = ["qwen2_5_vl", "llava"]
#: The forced keep ratio of the half-precision runs: the kept count of a request is then
#: clamp(int(ratio * N), 1, N) whatever the VIP's logits (the authors' fixed_remain_ratio).
FIXED_RATIO = 0.25

#: Added to the tiny engines' arguments for every test here. A fixed 1 GiB KV cache (the CPU
#: tests use the same) and a low memory fraction: engines are started one after another in one
#: process, and vLLM refuses to start when less than ``gpu_memory_utilization`` of the device is
#: free.
GPU_ENGINE_ARGS = {
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.2,
    "kv_cache_memory_bytes": 1 << 30,
}


@pytest.fixture(scope="module", autouse=True)
def cuda_engine_settings():
    from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS

    # (torch's backend flags are saved and restored by hand: MonkeyPatch cannot undo them)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pytest.MonkeyPatch.context() as mp:
        for key, value in GPU_ENGINE_ARGS.items():
            mp.setitem(TINY_ENGINE_ARGS, key, value)
        mp.setenv("TRITON_F32_DEFAULT", "ieee")  # part of Triton's kernel cache key
        mp.setenv("VLLM_FLOAT32_MATMUL_PRECISION", "highest")  # vLLM's worker applies it
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False  # CLIP's patch convolution
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# ---- helpers -----------------------------------------------------------------------------------


def _engine_core(llm):
    core = llm.llm_engine.engine_core
    assert hasattr(core, "engine_core"), (
        "the engine core runs in another process: these tests read its scheduler and count the "
        "model's kernel launches in this one (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return core.engine_core


def _model_runner_class(worker) -> type:
    """The worker's model runner class (run by ``LLM.collective_rpc``)."""
    return type(worker.model_runner)


def _model_state_class(worker) -> type:
    """The MRv2 runner's model state class (run by ``LLM.collective_rpc``)."""
    return type(worker.model_runner.model_state)


def _assert_model_runner_v2(llm) -> None:
    """Engines running our variants are on vLLM's Model Runner V2, as vLLM chooses on CUDA, and
    vLLM's own choice (``use_v2_model_runner``, read by its scheduler, warm-up and compilation
    defaults) agrees; GlimpsePrune's runner and state are ours."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_glimpse.settings import pruning_config_of

    config = llm.llm_engine.vllm_config
    assert config.use_v2_model_runner is True
    [runner] = llm.collective_rpc(_model_runner_class)
    assert issubclass(runner, GPUModelRunner), f"{runner.__module__}.{runner.__qualname__}"
    if pruning_config_of(config.model_config.hf_config).method == "glimpse":
        [state] = llm.collective_rpc(_model_state_class)
        assert runner.__name__ == "GlimpseGPUModelRunnerV2"
        assert state.__name__ == "GlimpseModelState"


def _check_runner_of_engines_started(monkeypatch, module) -> list:
    """Engines started through ``module.make_llm`` are checked by :func:`_assert_model_runner_v2`
    as they start; the returned list grows by one per engine checked."""
    from vllm_glimpse.testing.generate import shutdown

    make_llm, checked = module.make_llm, []

    def make(*args, **kwargs):
        llm = make_llm(*args, **kwargs)
        try:
            _assert_model_runner_v2(llm)
        except BaseException:
            shutdown(llm)
            raise
        checked.append(llm.llm_engine.vllm_config.model_config.model)
        return llm

    monkeypatch.setattr(module, "make_llm", make)
    return checked


def _language_attention_impls(model) -> list[str]:
    """The attention implementation of each decoder layer (run by ``LLM.apply_model``)."""
    return [type(layer.self_attn.attn.impl).__name__ for layer in model._glimpse_text_model().layers]


def _generate_checking_blocks(llm, specs, max_tokens):
    """Greedy outputs of ``specs`` (one batch, stepped by hand), with the KV pool checked: after
    the first step, which prefills every request and prunes every image request, the free
    blocks are total - sum(cdiv(length, block_size)) over the requests, each pruned request
    holding only its survivors; when all have finished, total again.

    Returns (the final ``RequestOutput`` of each spec, the length each request held after the
    prefill step)."""
    from vllm import SamplingParams
    from vllm.utils.math_utils import cdiv

    from vllm_glimpse.testing.workloads import build_request

    engine = llm.llm_engine
    scheduler = _engine_core(llm).scheduler
    pool = scheduler.kv_cache_manager.block_pool
    block_size = scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    total = pool.get_num_free_blocks()
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, spec in enumerate(specs):
        engine.add_request(str(i), build_request(tokenizer, spec), params)
    finished = {}

    def collect(outputs):
        for out in outputs:
            if out.finished:
                finished[int(out.request_id)] = out

    collect(engine.step())  # the prefill step
    running = list(scheduler.running)
    assert len(running) == len(specs), "every prompt is prefilled in the first step"
    held = {}
    for request in running:
        i = int(request.request_id.split("-")[0])
        assert request.num_computed_tokens == request.num_prompt_tokens
        held[i] = request.num_computed_tokens
        if specs[i].images:  # pruned in this step: its images consumed, its original kept
            assert not request.mm_features, specs[i]
            assert request.request_id in scheduler.glimpse_originals, specs[i]
    assert pool.get_num_free_blocks() == total - sum(cdiv(n, block_size) for n in held.values())
    while engine.has_unfinished_requests():
        collect(engine.step())
    assert pool.get_num_free_blocks() == total, "every block is back once all requests finished"
    assert not scheduler.glimpse_originals and not scheduler.pending_stats
    return [finished[i] for i in range(len(specs))], held


# ---- VisionZip, float32 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_llava(tiny_models):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = tiny_models["llava"]
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def hf_qwen(tiny_models):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    path = tiny_models["qwen2_5_vl"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (162, 30)])
def test_visionzip_llava_greedy_tokens_equal_hf_reference(tiny_models, hf_llava, dominant,
                                                          contextual, monkeypatch):
    from tests import engine_reference
    from tests.engine_reference import assert_engine_matches_reference
    from tests.reference.visionzip_hf import llava_generate

    checked = _check_runner_of_engines_started(monkeypatch, engine_reference)
    model, processor = hf_llava
    assert_engine_matches_reference(
        tiny_models["llava"], "visionzip", {"dominant": dominant, "contextual": contextual},
        lambda prompt, images: llava_generate(model, processor, prompt, images, dominant,
                                              contextual, MAX_TOKENS),
        MAX_TOKENS)
    assert checked == [tiny_models["llava"]]


@pytest.mark.parametrize("dominant_ratio, contextual_ratio", [(0.65, 0.05), (0.1, 0.02)])
def test_visionzip_qwen_greedy_tokens_equal_hf_reference(tiny_models, hf_qwen, dominant_ratio,
                                                         contextual_ratio, monkeypatch):
    """(On MRv2: our state switches the M-RoPE recompute for pruned images on.)"""
    from tests import engine_reference
    from tests.engine_reference import assert_engine_matches_reference
    from tests.reference.visionzip_hf import qwen_generate

    checked = _check_runner_of_engines_started(monkeypatch, engine_reference)
    model, processor = hf_qwen
    assert_engine_matches_reference(
        tiny_models["qwen2_5_vl"], "visionzip",
        {"dominant_ratio": dominant_ratio, "contextual_ratio": contextual_ratio},
        lambda prompt, images: qwen_generate(model, processor, prompt, images, dominant_ratio,
                                             contextual_ratio, MAX_TOKENS),
        MAX_TOKENS)
    assert checked == [tiny_models["qwen2_5_vl"]]


def test_visionzip_qwen_with_cuda_graphs_equals_eager(tiny_models):
    """MRv2 as vLLM runs it on CUDA by default (compiled, CUDA graphs): VisionZip's state (vLLM's
    M-RoPE pruner, before the forward) does not constrain the graphs, and greedy tokens equal the
    eager engine's."""
    from vllm.config.compilation import CUDAGraphMode

    from vllm_glimpse.testing.generate import generate_tokens, make_llm, shutdown
    from vllm_glimpse.testing.workloads import mixed_batch

    knobs = {"dominant_ratio": 0.45, "contextual_ratio": 0.05}
    tokens = {}
    for eager in (True, False):
        llm = make_llm(tiny_models["qwen2_5_vl"], method="visionzip", knobs=knobs,
                       enforce_eager=eager)
        try:
            _assert_model_runner_v2(llm)
            [state] = llm.collective_rpc(_model_state_class)
            assert state.__name__ == "VisionZipMRopeModelState"
            mode = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode
            assert (mode == CUDAGraphMode.NONE) == eager, mode
            tokens[eager] = generate_tokens(llm, mixed_batch(), MAX_TOKENS)
        finally:
            shutdown(llm)
    assert tokens[False] == tokens[True]


@pytest.mark.parametrize("family", FAMILIES)
def test_glimpse_with_cuda_graphs_equals_eager(tiny_models, glimpse_checkpoints, family):
    """GlimpsePrune as vLLM runs on CUDA by default (compiled, FULL_AND_PIECEWISE CUDA graphs):
    the prune steps are dispatched eagerly, decode steps replay graphs, and greedy tokens and
    kept counts equal the eager engine's."""
    from vllm_glimpse.stats import STATS_KEY
    from vllm_glimpse.testing.generate import make_llm, shutdown
    from vllm_glimpse.testing.workloads import build_request, mixed_batch

    knobs = {"checkpoint": glimpse_checkpoints[family], "fixed_ratio": 0.25}
    runs = {}
    for eager in (True, False):
        llm = make_llm(tiny_models[family], method="glimpse", knobs=knobs, enforce_eager=eager)
        try:
            _assert_model_runner_v2(llm)
            from vllm import SamplingParams

            tokenizer = llm.get_tokenizer()
            prompts = [build_request(tokenizer, s) for s in mixed_batch()]
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
            outs = llm.generate(prompts, params, use_tqdm=False)
            runs[eager] = [(list(o.outputs[0].token_ids),
                            ((o.kv_transfer_params or {}).get(STATS_KEY) or {}).get(
                                "image_tokens_after")) for o in outs]
        finally:
            shutdown(llm)
    assert runs[False] == runs[True]


# ---- GlimpsePrune -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["fixed_ratio", "checkpoint_threshold"])
def test_glimpse_float32_tokens_stats_and_blocks_equal_hf_reference(
        tiny_models, glimpse_checkpoints, hf_glimpse, family, rule):
    """Float32 (a non-FlashAttention backend): greedy tokens and per-request stats equal the HF
    reference on the mixed batch; the KV pool holds exactly the survivors after the prefill
    step and is whole again at the end."""
    from vllm_glimpse.glimpse import KeepRule
    from vllm_glimpse.stats import STATS_KEY
    from vllm_glimpse.testing.generate import make_llm, shutdown
    from vllm_glimpse.testing.workloads import build_request, mixed_batch

    knobs, keep_rule = {
        "fixed_ratio": ({"fixed_ratio": FIXED_RATIO}, KeepRule(fixed_remain_ratio=FIXED_RATIO)),
        "checkpoint_threshold": ({}, None),  # the checkpoint's own rule (threshold 0.5)
    }[rule]
    specs = mixed_batch()
    llm = make_llm(tiny_models[family], method="glimpse",
                   knobs={"checkpoint": glimpse_checkpoints[family], **knobs}, block_size=32)
    try:
        tokenizer = llm.get_tokenizer()
        assert torch.get_float32_matmul_precision() == "highest"  # no TF32 (see the docstring)
        _assert_model_runner_v2(llm)
        outputs, held = _generate_checking_blocks(llm, specs, MAX_TOKENS)
    finally:
        shutdown(llm)
    pruned_somewhere = False
    for i, (spec, out) in enumerate(zip(specs, outputs)):
        images = [img.build() for img in spec.images]
        want, prepared = hf_glimpse[family].generate(build_request(tokenizer, spec)["prompt"],
                                                     images, MAX_TOKENS, keep_rule)
        assert list(out.outputs[0].token_ids) == want.tokens, f"{spec}: tokens differ"
        assert list(out.prompt_token_ids) == prepared.input_ids.tolist(), spec
        stats = (out.kv_transfer_params or {}).get(STATS_KEY)
        if not images:
            assert stats is None  # text-only requests are untouched
            assert held[i] == len(out.prompt_token_ids)
            continue
        num_image_tokens = int(want.keep.numel())
        assert stats["image_tokens_before"] == num_image_tokens
        assert stats["image_tokens_per_image_after"] == want.kept_per_image
        assert stats["image_tokens_after"] == int(want.keep.sum())
        assert stats["prompt_tokens_after"] == int(want.survivor_index.numel())
        assert held[i] == stats["prompt_tokens_after"], "the request holds its survivors only"
        pruned_somewhere |= stats["image_tokens_after"] < num_image_tokens
    assert pruned_somewhere


# ---- GlimpsePrune, float16 / bfloat16 on FlashAttention: the Triton path -------------------------


class _LaunchCounter:
    """Stands in for a ``@triton.jit`` kernel in its module: counts ``kernel[grid](...)``."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch(*args, **kwargs):
            self.launches += 1
            return run(*args, **kwargs)

        return launch


def _count_kernel_launches(monkeypatch) -> dict[str, _LaunchCounter]:
    """Count launches of the Triton kernels GlimpsePrune's prune step can make: the glimpse
    scores from the paged cache (plus the per-sequence logsumexp for log-softmax scores), the
    K/V move into compacted slots, and the keep rule's compaction."""
    from vllm_glimpse.kernels import glimpse_triton, kv_compaction_triton

    kernels = {"scores": (glimpse_triton, "_glimpse_logits_kernel"),
               "logsumexp": (glimpse_triton, "_sequence_lse_kernel"),
               "kv_move": (kv_compaction_triton, "_scatter_kv_kernel"),
               "keep": (glimpse_triton, "_keep_compact_kernel")}
    counters = {}
    for name, (module, attr) in kernels.items():
        counters[name] = _LaunchCounter(getattr(module, attr))
        monkeypatch.setattr(module, attr, counters[name])
    return counters


def _record_scores_with_reference(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each call the engine makes to ``glimpse_attention_logits`` also runs the torch reference
    (``backend="torch"``: a plain gather of each key from the same paged cache) on the same
    arguments; the pairs are returned to the test (an assertion inside the forward would only
    show as an engine failure)."""
    import sys

    from vllm_glimpse.kernels import glimpse_triton

    pairs = []
    launcher = glimpse_triton.glimpse_attention_logits

    def scored_with_reference(*args, **kwargs):
        out = launcher(*args, **kwargs)
        want = launcher(*args, **{**kwargs, "backend": "torch"})
        pairs.append((out.cpu(), want.cpu()))
        return out

    # wherever the plugin holds the launcher (its module, and any module that imported it by name)
    for name, module in list(sys.modules.items()):
        if ((name == "vllm_glimpse" or name.startswith("vllm_glimpse."))
                and getattr(module, "glimpse_attention_logits", None) is launcher):
            monkeypatch.setattr(module, "glimpse_attention_logits", scored_with_reference)
    return pairs


def _run_glimpse(path, knobs, dtype, specs):
    from vllm_glimpse.testing.generate import make_llm, shutdown

    llm = make_llm(path, method="glimpse", knobs=knobs, dtype=dtype, block_size=32,
                   attention_config={"backend": "FLASH_ATTN"})
    try:
        _assert_model_runner_v2(llm)
        [impls] = llm.apply_model(_language_attention_impls)
        outputs, held = _generate_checking_blocks(llm, specs, MAX_TOKENS)
    finally:
        shutdown(llm)
    return impls, outputs, held


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_glimpse_flash_attention_triton_path(tiny_models, glimpse_checkpoints, hf_glimpse, family, dtype,
                                             monkeypatch):
    """Half precision on vLLM's FlashAttention: the prune step scores from the paged cache and
    moves K/V with our Triton kernels (their launches counted), kept counts are exactly the
    forced ratio's, tail blocks go back to the pool in the prefill step, and the greedy tokens
    equal those of the same engine with the cache read back through the layout probed from
    vLLM's own cache writer (torch scores, vLLM's writer for the move).

    Why not an HF reference here: in float16/bfloat16 every rounding point matters on these
    random tiny weights. The HF reference itself, run on the CPU in float16 or bfloat16 instead
    of float32 (same keep rule), gives different greedy tokens on 9 resp. 13 of the 14
    requests (both models, mixed batch, 12 tokens) and often a different kept set. The float32
    engine is compared with HF in the test above; here both runs execute the same FlashAttention
    kernels on the same inputs and differ only in how the prune step reads and moves the cache
    (scores agree to float32 summation order, checked below, and K/V moves are exact copies),
    so any difference in tokens is the Triton path's. (Only two VIP logits tied at the keep
    boundary to within what that summation order can change after the VIP's own half-precision
    rounding could make the two runs keep different tokens.)
    """
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("vLLM's FlashAttention needs compute capability 8.0 or newer")
    from vllm_glimpse.engine import kv
    from vllm_glimpse.stats import STATS_KEY
    from vllm_glimpse.testing.workloads import mixed_batch

    specs = mixed_batch()
    knobs = {"checkpoint": glimpse_checkpoints[family], "fixed_ratio": FIXED_RATIO}
    log_softmax = not hf_glimpse[family].predictor.config.use_attention_logits  # LLaVA

    counters = _count_kernel_launches(monkeypatch)
    scores = _record_scores_with_reference(monkeypatch)
    impls, triton_out, triton_held = _run_glimpse(tiny_models[family], knobs, dtype, specs)
    assert set(impls) == {"FlashAttentionImpl"}, impls
    launched = {name: c.launches for name, c in counters.items()}
    assert launched["scores"] >= 1 and launched["kv_move"] >= 1 and launched["keep"] >= 1, launched
    assert launched["logsumexp"] == (launched["scores"] if log_softmax else 0), launched
    assert len(scores) >= 1
    for got, want in scores:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # The same engine, the cache read back through the probed layout instead.
    monkeypatch.setattr(kv, "flash_attention_views", lambda attn: None)
    counters = _count_kernel_launches(monkeypatch)
    impls, readback_out, readback_held = _run_glimpse(tiny_models[family], knobs, dtype, specs)
    assert set(impls) == {"FlashAttentionImpl"}, impls
    launched = {name: c.launches for name, c in counters.items()}
    assert launched["scores"] == launched["logsumexp"] == launched["kv_move"] == 0, launched
    assert launched["keep"] >= 1, launched

    for i, spec in enumerate(specs):
        ours, other = triton_out[i], readback_out[i]
        assert list(ours.outputs[0].token_ids) == list(other.outputs[0].token_ids), spec
        assert triton_held[i] == readback_held[i], spec
        stats = (ours.kv_transfer_params or {}).get(STATS_KEY)
        if not spec.images:
            assert stats is None
            continue
        assert stats == other.kv_transfer_params[STATS_KEY], spec
        n = stats["image_tokens_before"]
        kept = min(max(int(FIXED_RATIO * n), 1), n)
        assert stats["image_tokens_after"] == kept, spec
        if len(spec.images) == 1:
            assert stats["image_tokens_per_image_after"] == [kept], spec
        # every text token stays, the glimpse token goes: the request holds exactly this
        assert triton_held[i] == stats["prompt_tokens_after"] == stats["prompt_tokens_before"] - n + kept

