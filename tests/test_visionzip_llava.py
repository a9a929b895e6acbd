"""VisionZip on LLaVA-1.5 and LLaVA-NeXT: the algorithm against the independent HF reference, and greedy
tokens of vLLM + plugin against HF transformers + reference VisionZip on the same weights."""

import pytest
import torch
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from tests.reference.visionzip_hf import (
    llava_generate,
    llava_next_generate,
    llava_visionzip_features,
)
from tests.engine_reference import assert_engine_matches_reference
from vllm_glimpse.testing.workloads import mixed_batch
from vllm_glimpse.visionzip import visionzip

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def hf_llava(tiny_models):
    path = tiny_models["llava"]
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (162, 30), (7, 0), (1, 3)])
def test_selection_and_merge_match_reference(hf_llava, dominant, contextual):
    model, processor = hf_llava
    images = [spec.build() for spec in (s.images[0] for s in mixed_batch()[:3])]
    pixel_values = processor.image_processor(images, return_tensors="pt").pixel_values
    want, want_index = llava_visionzip_features(model.model.vision_tower, pixel_values,
                                                dominant, contextual)

    # Our algorithm core on the same layer's hidden states, CLS attention and keys.
    tower = model.model.vision_tower
    layer = tower.encoder.layers[-2]
    keys = {}
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.setdefault("k", o))
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    hook.remove()
    hidden, attn = out.hidden_states[-2], out.attentions[-2]
    head_mean_keys = keys["k"].view(*hidden.shape[:2], attn.shape[1], -1).mean(2)
    for i in range(len(images)):
        got = visionzip(hidden[i], attn[i, :, 0].sum(0), head_mean_keys[i], dominant, contextual,
                        always_keep=torch.tensor([0]))
        assert got.dominant_index.tolist() == sorted(want_index[i].tolist())
        assert got.tokens.shape == (dominant + contextual, hidden.shape[-1])
        torch.testing.assert_close(got.tokens, want[i], rtol=1e-5, atol=1e-5)


def _assert_engine_matches_reference(path, model, processor, reference, dominant, contextual):
    assert_engine_matches_reference(
        path, "visionzip", {"dominant": dominant, "contextual": contextual},
        lambda prompt, images: reference(model, processor, prompt, images, dominant, contextual,
                                         MAX_TOKENS),
        MAX_TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("dominant, contextual", [(54, 10), (162, 30)])
def test_greedy_tokens_match_hf_reference(tiny_models, hf_llava, dominant, contextual):
    model, processor = hf_llava
    _assert_engine_matches_reference(tiny_models["llava"], model, processor, llava_generate,
                                     dominant, contextual)


@pytest.mark.slow
def test_llava_next_greedy_tokens_match_hf_reference(tiny_models):
    path = tiny_models["llava_next"]
    model = LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    _assert_engine_matches_reference(path, model.eval(), AutoProcessor.from_pretrained(path),
                                     llava_next_generate, 54, 10)
