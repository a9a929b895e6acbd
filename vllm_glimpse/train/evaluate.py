"""Accuracy on held-out easy-vqa mosaics through a real vLLM engine (``LLM.generate``, greedy),
with the image tokens each request kept (from the plugin's per-request stats; all of them for
an engine that does not prune)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm_glimpse.train.mosaic import MosaicSample, answer_of, majority_rate, mosaic_sample
from vllm_glimpse.train.vlm import chat_prompt

#: enough for any answer (one word) and the end of turn
MAX_TOKENS = 4


def held_out_samples(n: int, *, grid: int = 4, side: int = 448, seed: int = 0) -> list[MosaicSample]:
    """The first ``n`` held-out samples (easy-vqa's test images only)."""
    return [mosaic_sample("test", i, grid=grid, side=side, seed=seed) for i in range(n)]


def evaluate(llm, samples: Sequence[MosaicSample], *, resize: int | None = None) -> dict[str, Any]:
    """Greedy answers of ``llm`` to ``samples``; accuracy, the majority-answer rate, and image
    tokens kept per request. ``resize``: send each mosaic downsampled to that side instead."""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    from vllm_glimpse.stats import STATS_KEY

    processor = AutoProcessor.from_pretrained(llm.llm_engine.model_config.model)
    requests = []
    for s in samples:
        image = s.image()
        if resize is not None:
            image = image.resize((resize, resize))
        requests.append({"prompt": chat_prompt(processor, s.question),
                         "multi_modal_data": {"image": image}})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.generate(requests, params, use_tqdm=False)
    answers, kept, before = [], [], []
    for out in outputs:
        answers.append(answer_of(out.outputs[0].text))
        stats = (out.kv_transfer_params or {}).get(STATS_KEY)
        if stats is not None:
            kept.append(stats["image_tokens_after"])
            before.append(stats["image_tokens_before"])
    correct = [a == s.answer for a, s in zip(answers, samples)]
    _, majority = majority_rate(samples)
    return {
        "requests": len(samples),
        "accuracy": sum(correct) / max(1, len(samples)),
        "majority_rate": majority,
        "answers": answers,
        "correct": correct,
        "image_tokens_kept": kept or None,
        "image_tokens_before": before or None,
    }
