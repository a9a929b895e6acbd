"""VisionZip on LLaVA-1.5 and LLaVA-NeXT: the algorithm against the independent HF reference, and greedy
tokens of vLLM + plugin against HF transformers + reference VisionZip on the same weights."""

import pytest
import torch
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from tests.engine_reference import assert_engine_matches_reference
from tests.reference.visionzip_hf import (
    llava_generate,
    llava_next_generate,
    llava_visionzip_features,
)
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


def test_precomputed_image_embeds_are_fed_as_given(tiny_models, hf_llava):
    """LLaVA-1.5 takes ``image_embeds`` as the projector's output. A VisionZip engine cannot
    prune them (no CLIP attention to score by) and feeds them to the LLM as given, with vLLM's
    placeholder count (one per embedding row). Given VisionZip's own output for an image
    (HF reference + projector), the request decodes what the pixel request decodes, in one
    batch with it; the benchmark's limit run relies on this."""
    from vllm import SamplingParams

    from vllm_glimpse.testing.generate import make_llm, shutdown
    from vllm_glimpse.testing.workloads import ImageSpec, chat_prompt, image_embeds_input

    model, processor = hf_llava
    image = ImageSpec("checker", 640, 360, 2).build()
    pixel_values = processor.image_processor([image], return_tensors="pt").pixel_values
    features, _ = llava_visionzip_features(model.model.vision_tower, pixel_values, 54, 10,
                                           model.config.vision_feature_layer)
    with torch.no_grad():
        embeds = model.model.multi_modal_projector(features)[0]  # [64, hidden]

    llm = make_llm(tiny_models["llava"], method="visionzip",
                   knobs={"dominant": 54, "contextual": 10}, enable_mm_embeds=True)
    try:
        prompt = chat_prompt(llm.get_tokenizer(), "What color is it?", 1)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": image}},
             {"prompt": prompt,
              "multi_modal_data": {"image": image_embeds_input("llava", embeds)}}],
            params, use_tqdm=False)
        # (vLLM's LLaVA cannot batch embeddings of different lengths: a call of its own)
        [shorter] = llm.generate(
            [{"prompt": prompt, "multi_modal_data": {
                "image": image_embeds_input("llava", embeds[:20])}}], params, use_tqdm=False)
    finally:
        shutdown(llm)
    pixel, given = outs
    assert len(given.prompt_token_ids) == len(pixel.prompt_token_ids)  # 64 placeholders each
    assert len(shorter.prompt_token_ids) == len(pixel.prompt_token_ids) - 44  # as given: 20
    assert list(given.outputs[0].token_ids) == list(pixel.outputs[0].token_ids)
