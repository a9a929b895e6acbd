"""VisionZip on Qwen3-VL and Qwen2-VL at tensor_parallel_size 2 on the CPU engine: the ViT's
heads are split across the ranks, the score and keys are averaged over all of them
(``vllm_glimpse.parallel``); the mixed batch's greedy tokens equal the HF reference."""

import pytest
from transformers import (
    AutoProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from tests.reference import visionzip_qwen_family_hf as ref
from tests.test_tensor_parallel import _generate, tp2_llm
from vllm_glimpse.testing.generate import shutdown
from vllm_glimpse.testing.tiny_models import tiny_model_path
from vllm_glimpse.testing.workloads import build_request, mixed_batch

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
RATIOS = (0.45, 0.05)
HF_CLASSES = {"qwen3_vl": Qwen3VLForConditionalGeneration,
              "qwen2_vl": Qwen2VLForConditionalGeneration}


@pytest.mark.parametrize("family", list(HF_CLASSES))
def test_visionzip_tp2_equals_reference(family):
    path = str(tiny_model_path(family))
    specs = mixed_batch()
    llm = tp2_llm(path, "visionzip", {"dominant_ratio": RATIOS[0],
                                      "contextual_ratio": RATIOS[1]})
    try:
        tokens, _ = _generate(llm, specs, MAX_TOKENS)
        tokenizer = llm.get_tokenizer()
    finally:
        shutdown(llm)
    model = HF_CLASSES[family].from_pretrained(path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    for spec, got in zip(specs, tokens):
        prompt = build_request(tokenizer, spec)["prompt"]
        want = ref.generate(model, processor, prompt, [i.build() for i in spec.images],
                            *RATIOS, MAX_TOKENS)
        assert got == want, spec
