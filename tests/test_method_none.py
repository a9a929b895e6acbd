"""With method ``none`` our model variants are vLLM's models: same greedy tokens as vanilla vLLM
running without the plugin loaded at all, on a batch mixing image sizes, a two-image prompt and
text-only prompts."""

import pytest

from vllm_glimpse.testing.generate import (
    generate_in_subprocess,
    generate_tokens,
    make_llm,
    shutdown,
)
from vllm_glimpse.testing.workloads import mixed_batch

pytestmark = pytest.mark.slow

VARIANT_ARCH = {
    "qwen2_5_vl": "PruningQwen2_5_VLForConditionalGeneration",
    "llava": "PruningLlavaForConditionalGeneration",
    "llava_next": "VisionZipLlavaNextForConditionalGeneration",
}


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava", "llava_next"])
def test_method_none_matches_vanilla_vllm(name, tiny_models):
    specs = mixed_batch()
    vanilla = generate_in_subprocess(tiny_models[name], specs, vanilla=True)

    llm = make_llm(tiny_models[name], method="none")
    try:
        assert llm.llm_engine.model_config.architectures == [VARIANT_ARCH[name]]
        ours = generate_tokens(llm, specs)
    finally:
        shutdown(llm)

    assert len(ours) == len(specs)
    for i, (a, b) in enumerate(zip(ours, vanilla)):
        assert a == b, f"request {i} ({specs[i]}): plugin {a} != vanilla {b}"
    # The batch must exercise the images: different images give different continuations.
    assert len({tuple(t) for t in vanilla}) == len(vanilla)
