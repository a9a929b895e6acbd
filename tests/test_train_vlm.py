"""The small-VLM trainer (``python -m vllm_glimpse.train vlm``): its checkpoint is deterministic from
the seed, written in the official hub naming, and vLLM loads it with its default loader and
serves it greedy through ``LLM.generate``. A few steps only: how far a full run gets on the
held-out split is the accuracy benchmark's, not a test's."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("easy_vqa")

from vllm_glimpse.testing.generate import make_llm, shutdown  # noqa: E402
from vllm_glimpse.train.evaluate import evaluate, held_out_samples  # noqa: E402
from vllm_glimpse.train.vlm import TrainConfig, train_vlm  # noqa: E402

STEPS, BATCH = 3, 2


def test_checkpoint_is_deterministic_and_vllm_serves_it(tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(family="qwen2_5_vl", steps=STEPS, batch_size=BATCH, warmup_steps=1)
    a = train_vlm(cfg, tmp_path / "a")
    train_vlm(cfg, tmp_path / "b")
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert set(wa) == set(wb) and all(wa[k].equal(wb[k]) for k in wa)
    # hub naming (what vLLM's Qwen2.5-VL loader maps), not transformers 5's module paths
    assert "visual.patch_embed.proj.weight" in wa and "model.embed_tokens.weight" in wa
    assert not any(k.startswith("model.language_model.") for k in wa)
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert report["samples_seen"] == STEPS * BATCH and report["final_loss"] == a["final_loss"]

    llm = make_llm(tmp_path / "a", method=None, max_model_len=2048)
    try:
        result = evaluate(llm, held_out_samples(4))
    finally:
        shutdown(llm)
    assert result["requests"] == 4 and len(result["answers"]) == 4
    assert result["image_tokens_kept"] is None  # a vanilla engine reports no pruning


def test_bad_training_settings_are_refused():
    with pytest.raises(ValueError, match="family must be one of qwen2_5_vl, llava"):
        TrainConfig(family="qwen3_vl")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0.0)
