"""Multimodal hashes include the pruning settings.

vLLM's processor cache and encoder cache are keyed by each item's hash (``mm_features[i].
identifier``). If pruning settings did not enter it, a cache could hand embeddings computed
under other settings (or none) to a pruned request. Checked through vLLM's own input processor
(what ``LLM.generate`` and the API server run), no engine needed.
"""

import pytest
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine.input_processor import InputProcessor

import vllm_glimpse
from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS
from vllm_glimpse.testing.workloads import build_request, mixed_batch

SETTINGS = {
    "llava": [("visionzip", {}), ("visionzip", {"dominant": 108, "contextual": 20}),
              ("visionzip", {"dominant": 54, "contextual": 9})],
    "qwen2_5_vl": [("visionzip", {}), ("visionzip", {"dominant_ratio": 0.45}),
                   ("visionzip", {"dominant_ratio": 0.45, "contextual_ratio": 0.04})],
}


def _features(path, request, engine_kwargs):
    config = EngineArgs(model=str(path), **TINY_ENGINE_ARGS, **engine_kwargs).create_engine_config()
    processed = InputProcessor(config).process_inputs(
        "r", request, SamplingParams(max_tokens=1), ("generate",))
    return [(f.identifier, f.mm_position.length) for f in processed.mm_features]


@pytest.mark.parametrize("model", sorted(SETTINGS))
def test_hashes_differ_between_settings_and_repeat_within(tiny_models, model):
    path = tiny_models[model]
    request = build_request(AutoTokenizer.from_pretrained(path), mixed_batch()[4])  # two images
    vanilla = _features(path, request, {})
    assert _features(path, request, vllm_glimpse.engine_kwargs("none")) == vanilla

    seen = {tuple(h for h, _ in vanilla)}
    for method, knobs in SETTINGS[model]:
        features = _features(path, request, vllm_glimpse.engine_kwargs(method, **knobs))
        hashes = tuple(h for h, _ in features)
        assert len(set(hashes)) == 2  # two different images
        assert hashes not in seen, f"{method} {knobs}: hashes equal to another setting's"
        seen.add(hashes)
        # The same settings give the same hashes, so the caches still hit.
        assert _features(path, request, vllm_glimpse.engine_kwargs(method, **knobs)) == features
    # Each image's placeholder count was fixed here, at prompt processing.
    method, knobs = SETTINGS[model][1]
    lengths = [n for _, n in _features(path, request, vllm_glimpse.engine_kwargs(method, **knobs))]
    if model == "llava":
        assert lengths == [128, 128]
    else:  # 336x336 -> 12x12 = 144 tokens, 224x392 -> 8x14 = 112 tokens; 0.45 / 0.05
        assert lengths == [64 + 7, 50 + 5]
