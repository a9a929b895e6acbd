"""vLLM + plugin against an HF reference on the mixed batch (shared by the method tests)."""

from vllm_glimpse.testing.generate import generate_tokens, make_llm, shutdown
from vllm_glimpse.testing.workloads import build_request, mixed_batch


def assert_engine_matches_reference(path, method, knobs, reference, max_tokens):
    """Greedy tokens of vLLM + plugin (``method``, ``knobs``) == ``reference(prompt, images)`` for
    every request of the mixed batch (images of several sizes, a two-image prompt, text-only
    prompts in one batch)."""
    specs = mixed_batch()
    llm = make_llm(path, method=method, knobs=knobs)
    try:
        tokenizer = llm.get_tokenizer()
        ours = generate_tokens(llm, specs, max_tokens)
    finally:
        shutdown(llm)
    for i, spec in enumerate(specs):
        request = build_request(tokenizer, spec)
        want = reference(request["prompt"], [img.build() for img in spec.images])
        assert ours[i] == want, f"request {i} ({spec}): vLLM {ours[i]} != reference {want}"
