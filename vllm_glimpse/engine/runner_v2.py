"""GlimpsePrune's overrides of vLLM's Model Runner V2 (MRv2), where no ``ModelState`` hook
reaches (everything else is :class:`vllm_glimpse.engine.model_states.GlimpseModelState`):

* ``sample_tokens``: the step's pruning results ride to the scheduler on the
  ``ModelRunnerOutput`` it builds (attribute ``plan.OUTPUT_ATTR``), which no state hook sees;
* ``initialize_kv_cache``: once the cache exists, LLaVA refuses one it cannot read back where
  prefix caching or chunked prefill needs it (:meth:`GlimpseModelMixin.glimpse_check_kv_cache`);
* ``profile_run``: vLLM sizes the KV cache from the peak memory of a dummy forward that never
  prunes; the prune step's own peak is held in a reservation meanwhile;
* ``execute_model``: a step that prunes runs eagerly (no CUDA graph, no padding to a capture
  size): the batch's graph mode is dispatched before any state hook runs.

Mixed into MRv2's GPU runner (:mod:`.gpu_runner_v2`) and CPU runner (:mod:`.cpu_runner_v2`);
:func:`prune_step_reservation` serves the V1 runner too.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from vllm_glimpse.engine.plan import OUTPUT_ATTR
from vllm_glimpse.settings import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)


@contextlib.contextmanager
def prune_step_reservation(model, num_tokens: int, device):
    """Hold, while vLLM profiles memory, what the prune step of a ``num_tokens`` step needs
    beyond the dummy forward's own peak (:meth:`GlimpseModelMixin.glimpse_profile_reserve_bytes`)."""
    enabled = getattr(model, "glimpse_enabled", False)
    nbytes = model.glimpse_profile_reserve_bytes(num_tokens) if enabled else 0
    reserve = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
    if nbytes:
        logger.info("vllm-glimpse: memory profiling holds %.1f MiB for the prune step of a "
                    "%d-token step", nbytes / 2**20, num_tokens)
    try:
        yield
    finally:
        del reserve


class GlimpseRunnerV2Mixin:
    """Mixed into vLLM's MRv2 ``GPUModelRunner`` (or its CPU subclass)."""

    def profile_run(self, *args, **kwargs):
        with prune_step_reservation(self.model, self.max_num_tokens, self.device):
            return super().profile_run(*args, **kwargs)

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False, *args, **kwargs):
        super().initialize_kv_cache(kv_cache_config, is_profiling, *args, **kwargs)
        if getattr(self.model, "glimpse_enabled", False) and not is_profiling:
            self.model.glimpse_check_kv_cache(kv_cache_config, self.vllm_config)

    def execute_model(self, scheduler_output, *args, **kwargs):
        state = self.model_state
        if (not kwargs.get("dummy_run", False) and hasattr(state, "begin_step")
                and state.begin_step(scheduler_output)):
            # In a real step, ``is_profile`` only makes vLLM dispatch the batch eagerly
            # (``need_eager`` of ``dispatch_cg_and_sync_dp``), as for its profile run: checked for
            # vLLM 0.32-0.34 by tests/test_vllm_versions.py.
            kwargs["is_profile"] = True
        return super().execute_model(scheduler_output, *args, **kwargs)

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        stats = getattr(self.model_state, "pruned_stats", None)
        if output is not None and stats:
            # sample_tokens returns an AsyncOutput wrapping the step's ModelRunnerOutput.
            runner_output = getattr(output, "model_runner_output", output)
            setattr(runner_output, OUTPUT_ATTR, dict(stats))
            stats.clear()
        return output
