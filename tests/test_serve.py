"""`vllm serve <model> --plugin visionzip ...` as users type it: the options in `--help`, one-line
errors for bad startup settings, and OpenAI-compatible chat completions with images against a
real server on loopback, driven by the `openai` client."""

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.reference.visionzip_hf import llava_generate
from vllm_glimpse.testing.workloads import ImageSpec, chat_prompt

VLLM = str(Path(sys.executable).with_name("vllm"))
MAX_TOKENS = 10


def _server_env():
    """The server runs as users start it: its own engine-core and worker processes (logging at
    INFO, so that its log says which model runner it chose)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="INFO")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env


def _assert_model_runner_of_server(log) -> None:
    """The server's workers run the model runner the test run asked for (the switch reaches the
    processes ``vllm serve`` spawns through the environment's start-up hook)."""
    from vllm_glimpse.cpu_mrv2 import requested

    text = log.read_text()
    if requested():
        assert "Using V2 Model Runner" in text, text[-3000:]
    else:
        assert "using the V1 model runner instead" in text and "Using V2 Model Runner" not in text, \
            text[-3000:]


def _vllm(*args, timeout=300):
    env = _server_env()
    return subprocess.run([VLLM, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_serve_help_lists_our_options():
    out = _vllm("serve", "--help=vllm-glimpse").stdout
    for option in ("--plugin {none,visionzip,glimpse}", "--visionzip-dominant",
                   "--visionzip-contextual", "--visionzip-dominant-ratio", "--glimpse-checkpoint",
                   "--glimpse-threshold", "--glimpse-max-ratio"):
        assert option in out, option


@pytest.mark.parametrize("case", ["range", "architecture", "wrong_knob", "missing_checkpoint",
                                  "method_not_for_model"])
def test_bad_startup_settings_exit_with_one_clear_line(tiny_models, tmp_path, case):
    llava = str(tiny_models["llava"])
    if case == "range":
        args, want = [llava, "--plugin", "visionzip", "--visionzip-dominant", "600"], (
            "--visionzip-dominant + --visionzip-contextual = 600 + 10 exceeds the 577 tokens")
    elif case == "architecture":
        (tmp_path / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 1,
            "vocab_size": 100}))
        args, want = [str(tmp_path), "--plugin", "visionzip"], (
            "does not support model architecture ['LlamaForCausalLM']")
    elif case == "wrong_knob":
        args, want = [llava, "--plugin", "glimpse", "--visionzip-dominant", "5"], (
            "--visionzip-dominant does not apply to --plugin glimpse")
    elif case == "missing_checkpoint":
        args, want = [llava, "--plugin", "glimpse", "--glimpse-checkpoint", str(tmp_path / "nowhere")], (
            f"--glimpse-checkpoint {tmp_path / 'nowhere'}: directory does not exist")
    else:
        args, want = [str(tiny_models["llava_next"]), "--plugin", "glimpse", "--glimpse-checkpoint",
                      str(tmp_path)], "pruning method 'glimpse' is not available for LLaVA-NeXT"
    proc = _vllm("serve", *args, "--port", str(_free_port()))
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("vllm-glimpse: error: ") and want in last_line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---- a real server ------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model, args, log):
    """`vllm serve <model> <args>` on a free loopback port, its output in ``log``; yields the
    OpenAI base URL once /health answers, stops the server afterwards."""
    port = _free_port()
    cmd = [VLLM, "serve", str(model), *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_server_env())
    try:
        _wait_ready(proc, port, log)
        _assert_model_runner_of_server(log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def visionzip_server(tiny_models, tmp_path_factory):
    """`vllm serve <tiny LLaVA> --plugin visionzip --visionzip-dominant 54 --visionzip-contextual 10`."""
    args = ["--plugin", "visionzip", "--visionzip-dominant", "54", "--visionzip-contextual", "10",
            "--dtype", "float32", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 2}',
            "--seed", "0", "--trust-request-mm-kwargs"]
    with running_server(tiny_models["llava"], args, tmp_path_factory.mktemp("serve") / "server.log") as url:
        yield url


def _wait_ready(proc, port, log, timeout=900):
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def _data_url(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def hf_llava(tiny_models):
    path = tiny_models["llava"]
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_with_two_images_equals_reference(visionzip_server, hf_llava, stream):
    """Two base64 images in one message: the answer equals HF transformers + the reference
    VisionZip, and the prompt holds 64 tokens per image (54 + 10) instead of 576."""
    from openai import OpenAI

    model, processor = hf_llava
    images = [ImageSpec("checker", 640, 360, 2).build(), ImageSpec("noise", 280, 504, 3).build()]
    question = "Compare the two images."
    client = OpenAI(base_url=visionzip_server, api_key="unused")
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(images[0])}},
        {"type": "image_url", "image_url": {"url": _data_url(images[1])}},
        {"type": "text", "text": question},
    ]}]
    request = dict(model=client.models.list().data[0].id, messages=messages, temperature=0.0,
                   max_tokens=MAX_TOKENS,
                   extra_body={"ignore_eos": True, "return_token_ids": True})
    if stream:
        chunks = client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True})
        text, token_ids, usage = "", [], None
        for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                token_ids += chunk.choices[0].model_extra.get("token_ids") or []
            usage = chunk.usage or usage
    else:
        response = client.chat.completions.create(**request)
        choice = response.choices[0]
        text, token_ids, usage = choice.message.content, choice.model_extra["token_ids"], response.usage

    # vLLM's chat endpoint renders the model's chat template and adds no BOS of its own.
    prompt = chat_prompt(processor.tokenizer, question, 2)
    want = llava_generate(model, processor, prompt, images, 54, 10, MAX_TOKENS,
                          add_special_tokens=False)
    assert token_ids == want
    assert text.strip() == processor.tokenizer.decode(want, skip_special_tokens=True).strip()
    assert usage.completion_tokens == MAX_TOKENS
    ids = processor.tokenizer(prompt, add_special_tokens=False).input_ids
    assert usage.prompt_tokens == len(ids) - 2 + 2 * 64  # each <image> became 54 + 10 tokens


@pytest.mark.slow
@pytest.mark.parametrize("case", ["corrupt_image", "too_many_images"])
def test_bad_image_input_is_a_400_and_the_server_keeps_serving(visionzip_server, case):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=visionzip_server, api_key="unused")
    model = client.models.list().data[0].id
    good = ImageSpec("gradient", 336, 336, 1).build()
    if case == "corrupt_image":
        urls = ["data:image/png;base64," + base64.b64encode(b"\x89PNG not really").decode()]
        want = "image"
    else:
        urls = [_data_url(good)] * 3
        want = "At most 2 image(s)"
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": "What is this?"})
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=model, max_tokens=2,
                                       messages=[{"role": "user", "content": content}])
    assert info.value.status_code == 400 and want in str(info.value)
    # The next request is served normally.
    ok = client.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(good)}},
        {"type": "text", "text": "What is this?"}]}])
    assert ok.usage.completion_tokens == 2 and ok.usage.prompt_tokens > 64


@pytest.mark.slow
def test_per_request_budget_through_the_api(visionzip_server):
    """extra_body mm_processor_kwargs: a valid budget changes the prompt's image tokens (64 ->
    128 per image); an out-of-range one is a 400 naming the key; the server keeps serving."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=visionzip_server, api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(ImageSpec("gradient", 336, 336, 7).build())}},
        {"type": "text", "text": "What is this?"}]}]

    def prompt_tokens(**mm_kwargs):
        extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=1,
                                                  extra_body=extra)
        return response.usage.prompt_tokens

    default = prompt_tokens()
    assert prompt_tokens(visionzip_dominant=108, visionzip_contextual=20) == default + 64
    with pytest.raises(BadRequestError) as info:
        prompt_tokens(visionzip_dominant=0)
    assert info.value.status_code == 400
    assert "visionzip_dominant must be >= 1, got 0" in str(info.value)
    assert prompt_tokens() == default


def scrape_metrics(base_url: str) -> dict[str, float]:
    """``/metrics`` of the server at ``base_url`` (…/v1) as {"name{labels}": value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def metric_delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@pytest.mark.slow
def test_stats_in_the_response_and_prometheus_metrics(visionzip_server):
    """Each request's image tokens before/after are in the response (also when a stop string,
    found in the front end, ends it), and /metrics counts them: kept-ratio histogram, saved and
    before counters, one observation per request with images."""
    from openai import OpenAI

    client = OpenAI(base_url=visionzip_server, api_key="unused")
    model = client.models.list().data[0].id
    images = [ImageSpec("checker", 640, 360, 12).build(), ImageSpec("noise", 280, 504, 13).build()]
    content = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
    content.append({"type": "text", "text": "Describe both."})
    request = dict(model=model, messages=[{"role": "user", "content": content}], temperature=0.0,
                   max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    before = scrape_metrics(visionzip_server)
    first = client.chat.completions.create(**request)
    text_only = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Count to three."}], max_tokens=2)
    text = first.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = client.chat.completions.create(**request, stop=[stop]) if stop.strip() else None
    after = scrape_metrics(visionzip_server)

    want = {"method": "visionzip", "image_tokens_before": 2 * 576, "image_tokens_after": 2 * 64,
            "image_tokens_per_image_before": [576, 576], "image_tokens_per_image_after": [64, 64],
            "prompt_tokens_before": first.usage.prompt_tokens + 2 * 512,
            "prompt_tokens_after": first.usage.prompt_tokens}
    assert first.model_extra["kv_transfer_params"]["vllm_glimpse"] == want
    assert not (text_only.model_extra.get("kv_transfer_params") or {}).get("vllm_glimpse")
    requests = 1
    if stopped is not None:
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.model_extra["kv_transfer_params"]["vllm_glimpse"] == want
        requests = 2
    label = "{method=visionzip}"
    assert metric_delta(before, after, "vllm_glimpse:image_tokens_kept_ratio_count" + label) == requests
    assert metric_delta(before, after, "vllm_glimpse:image_tokens_kept_ratio_sum" + label) == pytest.approx(
        requests * 128 / 1152)
    assert metric_delta(before, after, "vllm_glimpse:image_tokens_saved_total" + label) == requests * 1024
    assert metric_delta(before, after, "vllm_glimpse:image_tokens_before_total" + label) == requests * 1152
    # 64/576 = 0.111: in the 0.15 bucket, not in the 0.1 one
    bucket = "vllm_glimpse:image_tokens_kept_ratio_bucket{le=%s,method=visionzip}"
    assert metric_delta(before, after, bucket % "0.15") == requests
    assert metric_delta(before, after, bucket % "0.1") == 0


@pytest.mark.slow
def test_a_method_the_engine_does_not_run_is_a_400(visionzip_server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=visionzip_server, api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(ImageSpec("gradient", 336, 336, 7).build())}},
        {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages, max_tokens=1,
                                       extra_body={"mm_processor_kwargs": {"glimpse_threshold": 0.3}})
    assert info.value.status_code == 400
    assert ("'glimpse_threshold' does not apply: this engine runs pruning method 'visionzip'"
            in str(info.value))
    ok = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    assert ok.usage.completion_tokens == 1
