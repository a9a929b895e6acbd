"""`vllm serve <model> --plugin glimpse ...` on loopback: chat completions with images prune inside
the engine, the answer equals the independent HF reference, the response carries the pruning
stats, and text-only requests share the server."""

import pytest
import torch
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

from tests.reference.glimpse_hf import glimpse_generate, prepare_qwen
from tests.test_serve import _data_url, running_server
from vllm_glimpse.glimpse import KeepRule, load_glimpse_checkpoint
from vllm_glimpse.testing.glimpse_checkpoints import write_tiny_checkpoint
from vllm_glimpse.testing.workloads import ImageSpec, chat_prompt

MAX_TOKENS = 8
RATIO = 0.25


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    path = tiny_models["qwen2_5_vl"]
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("gp") / "qwen", "qwen2_5_vl",
                                     AutoConfig.from_pretrained(path)))


@pytest.fixture(scope="module")
def glimpse_server(tiny_models, checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--plugin", "glimpse", "--glimpse-checkpoint", checkpoint,
            "--glimpse-fixed-ratio", str(RATIO), "--dtype", "float32",
            "--limit-mm-per-prompt", '{"image": 2}', "--seed", "0", "--max-model-len", "4096"]
    with running_server(tiny_models["qwen2_5_vl"], args, log) as url:
        yield url, log


@pytest.mark.slow
def test_chat_completion_prunes_and_equals_reference(glimpse_server, tiny_models, checkpoint):
    from openai import OpenAI

    url, log = glimpse_server
    path = tiny_models["qwen2_5_vl"]
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

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    predictor = load_glimpse_checkpoint(checkpoint, model.config, dtype=torch.float32).predictor
    prompt = chat_prompt(processor.tokenizer, question, 2)
    prepared = prepare_qwen(model, processor, prompt, images, predictor.config.selected_visual_layers)
    want = glimpse_generate(model, prepared, predictor, MAX_TOKENS,
                            keep_rule=KeepRule(fixed_remain_ratio=RATIO))
    assert token_ids == want.tokens

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
