"""`vllm serve <Qwen3-VL | Qwen2-VL> --plugin visionzip` as users run it (one server per model):
chat completions with images equal to HF transformers + the reference VisionZip, per-request
budgets through ``mm_processor_kwargs``, each request's pruning stats in the response and the
Prometheus metrics on ``/metrics``."""

import pytest
from transformers import (
    AutoProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from tests.reference import visionzip_qwen_family_hf as ref
from tests.test_serve import _data_url, metric_delta, running_server, scrape_metrics
from vllm_glimpse.settings import visionzip_counts
from vllm_glimpse.testing.tiny_models import tiny_model_path
from vllm_glimpse.testing.workloads import ImageSpec, chat_prompt

MAX_TOKENS = 8
IMAGES = [ImageSpec("checker", 640, 360, 2), ImageSpec("noise", 280, 504, 3)]


MODELS = {"qwen3_vl": ("Qwen3-VL", Qwen3VLForConditionalGeneration),
          "qwen2_vl": ("Qwen2-VL", Qwen2VLForConditionalGeneration)}


@pytest.fixture(scope="module", params=list(MODELS))
def name(request):
    return request.param


@pytest.fixture(scope="module")
def path(name):
    return str(tiny_model_path(name))


@pytest.fixture(scope="module")
def server(path, tmp_path_factory):
    args = ["--plugin", "visionzip", "--dtype", "float32", "--enforce-eager",
            "--limit-mm-per-prompt", '{"image": 2}', "--seed", "0",
            "--trust-request-mm-kwargs"]
    with running_server(path, args, tmp_path_factory.mktemp("serve") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def hf(name, path):
    model = MODELS[name][1].from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


def _client(url):
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused")
    return client, client.models.list().data[0].id


def _messages(images, question):
    content = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def _unpruned(processor, images):
    return [int(g.prod()) // 4 for g in processor.image_processor(images=images).image_grid_thw]


@pytest.mark.slow
@pytest.mark.parametrize("ratios", [None, (0.2, 0.05)])
def test_chat_completion_equals_reference_with_stats(server, hf, ratios):
    """Two images in one message, at the engine's budget or the request's own: the answer
    equals HF + the reference VisionZip, the prompt holds D + C tokens per image, and the
    response carries the request's pruning stats."""
    model, processor = hf
    client, served = _client(server)
    images = [spec.build() for spec in IMAGES]
    question = "Compare the two images."
    extra = {"ignore_eos": True, "return_token_ids": True}
    if ratios is not None:
        extra["mm_processor_kwargs"] = {"visionzip_dominant_ratio": ratios[0],
                                        "visionzip_contextual_ratio": ratios[1]}
    response = client.chat.completions.create(
        model=served, messages=_messages(images, question), temperature=0.0, max_tokens=MAX_TOKENS,
        extra_body=extra)
    ratios = ratios or (0.65, 0.05)
    prompt = chat_prompt(processor.tokenizer, question, 2)
    want = ref.generate(model, processor, prompt, images, *ratios, MAX_TOKENS)
    assert response.choices[0].model_extra["token_ids"] == want

    before = _unpruned(processor, images)
    after = [sum(visionzip_counts(n, *ratios)) for n in before]
    text_tokens = len(processor.tokenizer(prompt).input_ids) - 2  # the two <|image_pad|>
    assert response.usage.prompt_tokens == text_tokens + sum(after)
    assert response.model_extra["kv_transfer_params"]["vllm_glimpse"] == {
        "method": "visionzip", "image_tokens_before": sum(before),
        "image_tokens_after": sum(after), "image_tokens_per_image_before": before,
        "image_tokens_per_image_after": after,
        "prompt_tokens_before": text_tokens + sum(before),
        "prompt_tokens_after": text_tokens + sum(after)}


@pytest.mark.slow
def test_bad_request_budget_is_a_400_and_the_server_keeps_serving(server, name):
    from openai import BadRequestError

    client, served = _client(server)
    messages = _messages([IMAGES[0].build()], "What is this?")
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(
            model=served, messages=messages, max_tokens=1,
            extra_body={"mm_processor_kwargs": {"visionzip_dominant": 54}})
    assert info.value.status_code == 400
    assert (f"visionzip on {MODELS[name][0]} takes ratios of each image's tokens"
            in str(info.value))
    assert "not visionzip_dominant" in str(info.value)
    ok = client.chat.completions.create(model=served, messages=messages, max_tokens=1)
    assert ok.usage.completion_tokens == 1


@pytest.mark.slow
def test_prometheus_metrics_count_each_request(server, hf):
    _, processor = hf
    client, served = _client(server)
    images = [IMAGES[1].build()]
    before_metrics = scrape_metrics(server)
    for _ in range(2):
        client.chat.completions.create(model=served, messages=_messages(images, "Describe it."),
                                       max_tokens=2)
    client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "Count to three."}], max_tokens=2)
    after_metrics = scrape_metrics(server)
    (before,) = _unpruned(processor, images)
    after = sum(visionzip_counts(before, 0.65, 0.05))
    label = "{method=visionzip}"
    assert metric_delta(before_metrics, after_metrics,
                        "vllm_glimpse:image_tokens_kept_ratio_count" + label) == 2
    assert metric_delta(before_metrics, after_metrics,
                        "vllm_glimpse:image_tokens_saved_total" + label) == 2 * (before - after)
    assert metric_delta(before_metrics, after_metrics,
                        "vllm_glimpse:image_tokens_before_total" + label) == 2 * before
