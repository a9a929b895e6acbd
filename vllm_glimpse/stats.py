"""Where pruning is reported: each request's stats, the Prometheus metrics (vLLM 0.32).

A request's stats are known in the engine core (VisionZip: from its images' placeholders when
the scheduler admits it; GlimpsePrune: in the step that prunes it) and reach the front end with
its next output, in ``kv_transfer_params["vllm_glimpse"]`` (the one per-request dict vLLM carries
from the engine core to ``RequestOutput`` and to the OpenAI response):

    {"method": "glimpse", "image_tokens_before": 1521, "image_tokens_after": 76,
     "image_tokens_per_image_before": [1521], "image_tokens_per_image_after": [76],
     "prompt_tokens_before": 1561, "prompt_tokens_after": 116}

The front end's output processor (:class:`PruningStatsOutputProcessor`) remembers them for the
request, puts them on every later output (so the final ``RequestOutput`` has them whatever ends
the request: a stop string is detected in the front end, after the engine core sent its last
output), and counts each request once in the Prometheus metrics on ``/metrics``:

* ``vllm_glimpse:image_tokens_kept_ratio`` (histogram): image tokens after / before, per request;
* ``vllm_glimpse:image_tokens_saved_total`` (counter): image tokens removed;
* ``vllm_glimpse:image_tokens_before_total`` (counter): image tokens before pruning;

labelled by ``method``. vLLM records its own metrics only with stats logging on (``vllm serve``'s
default; off with ``--disable-log-stats`` and in offline ``LLM``); ours follow the same switch.

For a GlimpsePrune request it also drops the glimpse token from the prompt ids the caller sees
(:func:`_drop_glimpse_token`).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.engine.output_processor import OutputProcessor

#: Key of ``RequestOutput.kv_transfer_params`` holding a request's pruning stats.
STATS_KEY = "vllm_glimpse"

# Per-image unpruned token counts, as a processor output field (VisionZip): [num_images].
TOKENS_BEFORE_FIELD = "vllm_glimpse_tokens_before"

KEPT_RATIO_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def pruning_stats(method: str, before_per_image: list[int], after_per_image: list[int],
                  prompt_tokens_before: int, prompt_tokens_after: int) -> dict[str, Any]:
    return {
        "method": method,
        "image_tokens_before": int(sum(before_per_image)),
        "image_tokens_after": int(sum(after_per_image)),
        "image_tokens_per_image_before": [int(n) for n in before_per_image],
        "image_tokens_per_image_after": [int(n) for n in after_per_image],
        "prompt_tokens_before": int(prompt_tokens_before),
        "prompt_tokens_after": int(prompt_tokens_after),
    }


def visionzip_request_stats(request) -> dict[str, Any] | None:
    """A VisionZip request's stats, from its images (engine core ``Request``): the count each
    image would take unpruned (carried by the processor) and its placeholder count."""
    images = [f for f in request.mm_features
              if f.modality == "image" and f.data is not None and TOKENS_BEFORE_FIELD in f.data]
    if not images:
        return None
    before = [int(f.data[TOKENS_BEFORE_FIELD].data) for f in images]
    after = [int(f.mm_position.length) for f in images]
    saved = sum(before) - sum(after)
    return pruning_stats("visionzip", before, after,
                         request.num_prompt_tokens + saved, request.num_prompt_tokens)


# ---- the front end ---------------------------------------------------------------------------

_metrics: tuple | None = None


def _pruning_metrics():
    """The three metrics, created once per process in prometheus_client's default registry
    (the one ``/metrics`` serves; multiprocess-aware when vLLM runs several API servers)."""
    global _metrics
    if _metrics is None:
        from prometheus_client import Counter, Histogram

        _metrics = (
            Histogram("vllm_glimpse:image_tokens_kept_ratio",
                      "Image tokens kept / image tokens before pruning, per request.",
                      labelnames=["method"], buckets=KEPT_RATIO_BUCKETS),
            Counter("vllm_glimpse:image_tokens_saved",
                    "Image tokens removed by pruning.", labelnames=["method"]),
            Counter("vllm_glimpse:image_tokens_before",
                    "Image tokens of pruned requests before pruning.", labelnames=["method"]),
        )
    return _metrics


def record_pruning_metrics(stats: dict[str, Any]) -> None:
    before, after = stats["image_tokens_before"], stats["image_tokens_after"]
    if before <= 0:
        return
    kept_ratio, saved, before_total = _pruning_metrics()
    method = stats.get("method", "unknown")
    kept_ratio.labels(method=method).observe(after / before)
    saved.labels(method=method).inc(before - after)
    before_total.labels(method=method).inc(before)


_STATE_ATTR = "vllm_glimpse_stats"  # on the front end's per-request RequestState


def _drop_glimpse_token(req_state) -> None:
    """The caller's prompt ids, without the glimpse token GlimpsePrune's processor appended to a
    request with images (``models.common.GlimpseTokenMixin``): ``RequestOutput.prompt_token_ids``
    and the OpenAI ``usage.prompt_tokens`` (vLLM counts that list) are then the prompt as sent.

    Called once per request, when its first stats arrive: GlimpsePrune prunes in the prefill step
    that samples the first token, so no output of the request was built before. A new list, so
    that a front end sharing the engine core's process never shortens the engine's own copy.
    ``prompt_len`` (vLLM's prompt-token metrics: the tokens the engine computed) is left as is."""
    ids = req_state.prompt_token_ids
    if ids:
        req_state.prompt_token_ids = list(ids[:-1])


class PruningStatsOutputProcessor(OutputProcessor):
    """vLLM's output processor, which also keeps each request's pruning stats (see module
    docstring). Installed by ``patches.report_pruning_stats_in_front_end``."""

    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        for out in engine_core_outputs:
            req_state = self.request_states.get(out.request_id)
            if req_state is None:
                continue
            params = out.kv_transfer_params
            stats = params.get(STATS_KEY) if params else None
            known = getattr(req_state, _STATE_ATTR, None)
            if stats is not None:
                if known is None:
                    if self.log_stats:
                        record_pruning_metrics(stats)
                    if stats.get("method") == "glimpse":
                        _drop_glimpse_token(req_state)
                setattr(req_state, _STATE_ATTR, stats)
            elif known is not None:
                out.kv_transfer_params = {**(params or {}), STATS_KEY: known}
        return super().process_outputs(engine_core_outputs, *args, **kwargs)
