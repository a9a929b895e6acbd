"""`vllm serve <model> --plugin glimpse ...` on loopback: chat completions with images prune inside
the engine, the answer equals the independent HF reference, the response carries the pruning
stats, and text-only requests share the server. The step budget is below the image prompts'
lengths: they are computed in chunks (vLLM's chunked prefill, on by default)."""

import pytest

from tests.test_serve import _data_url, metric_delta, running_server, scrape_metrics
from vllm_glimpse.glimpse import KeepRule
from vllm_glimpse.testing.workloads import ImageSpec, chat_prompt

MAX_TOKENS = 8
RATIO = 0.25


@pytest.fixture(scope="module")
def checkpoint(glimpse_checkpoints):
    return glimpse_checkpoints["qwen2_5_vl"]


# Tokens per step: the two-image prompt below (about 500 tokens) takes two steps.
STEP_BUDGET = 384


@pytest.fixture(scope="module")
def glimpse_server(tiny_models, checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--plugin", "glimpse", "--glimpse-checkpoint", checkpoint,
            "--glimpse-fixed-ratio", str(RATIO), "--dtype", "float32",
            "--limit-mm-per-prompt", '{"image": 2}', "--seed", "0", "--max-model-len", "1024",
            "--max-num-batched-tokens", str(STEP_BUDGET), "--trust-request-mm-kwargs"]
    with running_server(tiny_models["qwen2_5_vl"], args, log) as url:
        yield url, log


@pytest.mark.slow
def test_chat_completion_prunes_and_equals_reference(glimpse_server, hf_glimpse):
    from openai import OpenAI

    url, log = glimpse_server
    images = [ImageSpec("checker", 640, 360, 2).build(), ImageSpec("noise", 280, 504, 3).build()]
    question = "Compare the two images."
    client = OpenAI(base_url=url, api_key="unused")
    model_id = client.models.list().data[0].id
    content = [{"type": "image_url", "image_url": {"url": _data_url(img)}} for img in images]
    content.append({"type": "text", "text": question})
    response = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": content}], temperature=0.0,
        max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True, "return_token_ids": True})
    token_ids = response.choices[0].model_extra["token_ids"]

    reference = hf_glimpse["qwen2_5_vl"]
    want, prepared = reference.generate(chat_prompt(reference.processor.tokenizer, question, 2),
                                        images, MAX_TOKENS, KeepRule(fixed_remain_ratio=RATIO))
    assert token_ids == want.tokens
    # the prompt as the caller sent it (HF's processor expands it the same way), without the
    # glimpse token the engine appends; usage counts it unpruned
    assert response.model_extra["prompt_token_ids"] == prepared.input_ids.tolist()
    assert response.usage.prompt_tokens == prepared.input_ids.numel()

    stats = response.model_extra["kv_transfer_params"]["vllm_glimpse"]
    assert stats["image_tokens_before"] == int(want.keep.numel())
    assert stats["image_tokens_per_image_after"] == want.kept_per_image
    assert stats["prompt_tokens_after"] == int(want.survivor_index.numel())

    # a text-only request on the same server is untouched
    text_only = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Please count the numbers."}],
        max_tokens=3, extra_body={"ignore_eos": True})
    assert text_only.usage.completion_tokens == 3
    assert not (text_only.model_extra.get("kv_transfer_params") or {}).get("vllm_glimpse")


def _image_message(image, text="What is this?"):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(image)}},
        {"type": "text", "text": text}]}]


@pytest.mark.slow
def test_per_request_keep_rule_stats_and_metrics(glimpse_server):
    """extra_body mm_processor_kwargs glimpse_fixed_ratio: the request keeps int(r * N) of its
    N image tokens (the engine: 0.25); a bad value is a 400 naming the key; /metrics counts each
    pruned request once with its kept ratio."""
    from openai import BadRequestError, OpenAI

    url, _ = glimpse_server
    client = OpenAI(base_url=url, api_key="unused")
    model = client.models.list().data[0].id
    messages = _image_message(ImageSpec("gradient", 448, 448, 21).build())

    def stats(**mm_kwargs):
        extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=2,
                                                  extra_body=extra)
        return response.model_extra["kv_transfer_params"]["vllm_glimpse"]

    before = scrape_metrics(url)
    default, custom = stats(), stats(glimpse_fixed_ratio=0.5)
    after = scrape_metrics(url)
    n = default["image_tokens_before"]
    assert n == 256  # 448 x 448 px: 16 x 16 merged tokens
    assert default["image_tokens_after"] == int(RATIO * n)
    assert custom["image_tokens_after"] == n // 2 and custom["image_tokens_before"] == n
    label = "{method=glimpse}"
    assert metric_delta(before, after, "vllm_glimpse:image_tokens_kept_ratio_count" + label) == 2
    kept_ratio_sum = metric_delta(before, after, "vllm_glimpse:image_tokens_kept_ratio_sum" + label)
    assert kept_ratio_sum == pytest.approx(0.75)
    saved = metric_delta(before, after, "vllm_glimpse:image_tokens_saved_total" + label)
    assert saved == n - n // 4 + n - n // 2

    with pytest.raises(BadRequestError) as info:
        stats(glimpse_max_ratio=1.5)
    assert info.value.status_code == 400
    assert "mm_processor_kwargs: glimpse_max_ratio must be in (0.0, 1.0], got 1.5" in str(info.value)
    assert stats() == default


@pytest.mark.slow
@pytest.mark.parametrize("case", ["too_large", "over_step_budget", "aspect_ratio", "tiny"])
def test_image_sizes_the_model_cannot_take(glimpse_server, case):
    """Qwen2.5-VL resizes every image into [min_pixels, max_pixels]: an image whose tokens do not
    fit the context (max_model_len 1024 here) or of aspect ratio >= 200 is a 400 naming the
    problem; a 1 x 1 image is upscaled to 28 x 28 (4 tokens) and served; a prompt three times the
    step budget (868 x 700 px is 31 x 25 = 775 image tokens) is served in chunks and pruned. The
    server goes on."""
    from openai import BadRequestError, OpenAI

    url, _ = glimpse_server
    client = OpenAI(base_url=url, api_key="unused")
    model = client.models.list().data[0].id
    sizes = {"too_large": (1400, 1400), "over_step_budget": (868, 700), "aspect_ratio": (5000, 20),
             "tiny": (1, 1)}
    messages = _image_message(ImageSpec("noise", *sizes[case], 22).build())
    if case in ("tiny", "over_step_budget"):
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
        stats = response.model_extra["kv_transfer_params"]["vllm_glimpse"]
        n = {"tiny": 4, "over_step_budget": 775}[case]
        assert stats["image_tokens_before"] == n and stats["image_tokens_after"] == int(RATIO * n)
        assert response.usage.completion_tokens == 2
        return
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert info.value.status_code == 400
    want = {"too_large": "exceeds model's maximum context length (1024)",
            "aspect_ratio": "image 1 is 5000x20 px: Qwen2.5-VL takes images whose longer side is "
                            "less than 200 times the shorter one"}[case]
    assert want in str(info.value)
    ok = client.chat.completions.create(
        model=model, messages=_image_message(ImageSpec("checker", 224, 224, 23).build()), max_tokens=2)
    assert ok.usage.completion_tokens == 2
