"""VisionZip on Qwen3-VL-MoE: the dense model's VisionZip code on the MoE LLM (same ViT,
processor and positions). One engine: greedy tokens of the mixed batch, at the engine's budget
and a request's own, equal HF transformers' Qwen3-VL-MoE + the independent reference."""

import pytest
from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

from tests.reference import visionzip_qwen_family_hf as ref
from tests.test_visionzip_qwen3 import _with_budget
from vllm_glimpse.settings import visionzip_counts
from vllm_glimpse.testing.generate import make_llm, shutdown
from vllm_glimpse.testing.tiny_models import tiny_model_path
from vllm_glimpse.testing.workloads import build_request, mixed_batch

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def path():
    return str(tiny_model_path("qwen3_vl_moe"))


@pytest.fixture(scope="module")
def hf(path):
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


def test_reference_keeping_every_token_is_hf_generate(hf):
    model, processor = hf
    spec = mixed_batch()[4]  # two images
    prompt = build_request(processor.tokenizer, spec)["prompt"]
    images = [i.build() for i in spec.images]
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    want = out[0, inputs.input_ids.shape[1]:].tolist()
    assert ref.generate(model, processor, prompt, images, 1.0, 0.0, MAX_TOKENS) == want


@pytest.mark.slow
def test_greedy_tokens_of_mixed_batch_match_hf_reference(path, hf):
    from vllm import SamplingParams

    model, processor = hf
    specs = mixed_batch()
    llm = make_llm(path, method="visionzip")
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for ratios in [(0.65, 0.05), (0.1, 0.02)]:
            requests = [_with_budget(build_request(llm.get_tokenizer(), s), ratios) for s in specs]
            outputs = llm.generate(requests, params, use_tqdm=False)
            for spec, request, output in zip(specs, requests, outputs):
                images = [i.build() for i in spec.images]
                want = ref.generate(model, processor, request["prompt"], images, *ratios,
                                    MAX_TOKENS)
                assert list(output.outputs[0].token_ids) == want, (ratios, spec)
                grids = processor.image_processor(images=images).image_grid_thw if images else []
                after = [sum(visionzip_counts(int(g.prod()) // 4, *ratios)) for g in grids]
                assert output.prompt_token_ids.count(model.config.image_token_id) == sum(after)
    finally:
        shutdown(llm)
