"""GlimpsePrune with vLLM's prefix caching on (its default), read through vLLM's own counter of
prefix-cache hits per request (``RequestOutput.num_cached_tokens``).

* a text-only request hits as in vanilla vLLM: every whole block of its prompt but the one
  holding its last token;
* a request with images hits the whole blocks before its first image (a shared system prompt, an
  earlier turn of a conversation with the same image), prunes in the step that computes the rest
  with those blocks' K/V read from the cache, and its greedy tokens equal the HF reference;
* blocks from the first image on hold compacted K/V and are never offered for reuse: the same
  request again hits exactly the blocks before its image, no more;
* the pool is whole again at the end.

(Preemption and recompute with prefix caching on: tests/test_glimpse_engine.py, whose engines
run with vLLM's default, prefix caching on.)
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig
from vllm import SamplingParams

from vllm_glimpse.glimpse import KeepRule
from vllm_glimpse.stats import STATS_KEY
from vllm_glimpse.testing.generate import make_llm, shutdown
from vllm_glimpse.testing.workloads import ImageSpec, RequestSpec, build_request

MAX_TOKENS = 5
BLOCK = 32
RATIO = 0.25
# A shared instruction in front of every prompt: several whole blocks before the first image.
SYSTEM = ("You are a careful assistant who looks at pictures and answers in one short sentence. "
          "Name colours, shapes and positions exactly, and say when something is not visible. ") * 2


def _prompt(tokenizer, text: str, images: tuple[ImageSpec, ...] = ()) -> dict:
    prompt = build_request(tokenizer, RequestSpec(text, images))
    prompt["prompt"] = SYSTEM + prompt["prompt"]
    return prompt


def _whole_blocks(n: int) -> int:
    return n // BLOCK * BLOCK


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def engine(request, tiny_models, glimpse_checkpoints):
    family = request.param
    llm = make_llm(tiny_models[family], method="glimpse", block_size=BLOCK,
                   knobs={"checkpoint": glimpse_checkpoints[family], "fixed_ratio": RATIO})
    hf = AutoConfig.from_pretrained(tiny_models[family])
    image_token = getattr(hf, "image_token_id", None) or hf.image_token_index
    yield family, llm, image_token
    shutdown(llm)


def _run(llm, prompt) -> object:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    [out] = llm.generate([prompt], params, use_tqdm=False)
    return out


def test_prefix_caching_is_on(engine):
    _, llm, _ = engine
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True


def test_text_only_requests_hit_as_in_vanilla(engine):
    _, llm, _ = engine
    prompt = _prompt(llm.get_tokenizer(), "Write a sentence about the sea and the sky at noon.")
    first, second = _run(llm, prompt), _run(llm, prompt)
    n = len(first.prompt_token_ids)
    assert n > 3 * BLOCK
    assert second.num_cached_tokens == _whole_blocks(n - 1) > 0
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)


def test_image_requests_hit_up_to_their_first_image_and_match_the_reference(engine, hf_glimpse):
    family, llm, image_token = engine
    tokenizer = llm.get_tokenizer()
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    total = pool.get_num_free_blocks()
    turn1 = _prompt(tokenizer, "What colour is the square?", (ImageSpec("checker", 448, 448, 11),))
    # a later turn: the same image at the same place, another question after it
    turn2 = _prompt(tokenizer, "And what is in the top left corner of it?",
                    (ImageSpec("checker", 448, 448, 11),))
    other = _prompt(tokenizer, "Describe it.", (ImageSpec("stripes", 336, 336, 12),))
    outs = [_run(llm, p) for p in (turn1, turn2, other, turn1)]
    rule = KeepRule(fixed_remain_ratio=RATIO)
    for prompt, out in zip((turn1, turn2, other, turn1), outs):
        ids = list(out.prompt_token_ids)
        first_image = ids.index(image_token)
        assert first_image > 2 * BLOCK
        stats = out.kv_transfer_params[STATS_KEY]
        assert stats["image_tokens_after"] < stats["image_tokens_before"]  # it pruned
        images = [prompt["multi_modal_data"]["image"]]
        want, _ = hf_glimpse[family].generate(prompt["prompt"], images, MAX_TOKENS, rule)
        assert list(out.outputs[0].token_ids) == want.tokens, f"{family}: tokens differ"
    first_image = list(outs[0].prompt_token_ids).index(image_token)
    # turn 1 may hit the instruction cached by another test's requests, never its image
    assert outs[0].num_cached_tokens <= _whole_blocks(first_image)
    # every later request hits exactly the whole blocks before its image: the image's blocks
    # (compacted when it pruned) were never cached, even for the very same request
    for out in outs[1:]:
        offset = list(out.prompt_token_ids).index(image_token)
        assert out.num_cached_tokens == _whole_blocks(offset) > 0
    assert pool.get_num_free_blocks() == total
