"""Fast checks of the tiny random-weight checkpoints (transformers only, no vLLM engine)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from vllm_glimpse.testing import tiny_models
from vllm_glimpse.testing.tiny_models import MODEL_NAMES, tiny_model_path

IMAGE_SIZE = {"qwen2_5_vl": 448, "llava": 336, "llava_next": 336, "qwen3_vl": 448,
              "qwen3_vl_moe": 448, "qwen2_vl": 448}
# Official hub layouts, which vLLM's default loader maps (transformers 5 converts them on load).
WEIGHT_PREFIXES = {
    "qwen2_5_vl": ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.", "visual."),
    "llava": ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
              "multi_modal_projector."),
    "llava_next": ("language_model.model.", "language_model.lm_head.",
                   "vision_tower.vision_model.", "multi_modal_projector.", "image_newline"),
    "qwen3_vl": ("model.language_model.", "model.visual.", "lm_head."),
    "qwen3_vl_moe": ("model.language_model.", "model.visual.", "lm_head."),
    "qwen2_vl": ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.", "visual."),
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def paths(cache_dir):
    return {name: tiny_model_path(name, cache_dir) for name in MODEL_NAMES}


def _images(size):
    from PIL import Image

    red = Image.new("RGB", (size, size), (255, 0, 0))
    noise = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    return {"red": red, "noise": noise}


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="qwen2_5_vl, llava, llava_next"):
        tiny_model_path("nope", tmp_path)


def test_cached_and_deterministic(paths, cache_dir, tmp_path):
    p = paths["llava"]
    assert p == cache_dir / "tiny-models" / f"llava-{tiny_models.FIXTURE_VERSION}"
    before = {f.name: f.stat().st_mtime_ns for f in p.iterdir()}
    assert tiny_model_path("llava", cache_dir) == p
    assert {f.name: f.stat().st_mtime_ns for f in p.iterdir()} == before  # not regenerated
    assert not [q for q in p.parent.iterdir() if q.name.startswith(".")]  # no temp dirs left
    fresh = tiny_models.generate("llava", tmp_path / "again")
    assert _digest(fresh) == _digest(p)


def test_env_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_GLIMPSE_CACHE", str(tmp_path))
    p = tiny_model_path("qwen2_5_vl")
    assert p == tmp_path / "tiny-models" / f"qwen2_5_vl-{tiny_models.FIXTURE_VERSION}"
    assert (p / "model.safetensors").is_file()


def test_cli(cache_dir, capsys):
    assert tiny_models.main(["--cache-dir", str(cache_dir), "llava", "qwen2_5_vl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["llava", "qwen2_5_vl"]
    assert lines[0].split("\t")[1] == str(tiny_model_path("llava", cache_dir))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_files_and_token_ids(paths, name):
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    path = paths[name]
    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    text_cfg = cfg.get_text_config()
    assert text_cfg.vocab_size >= len(tok)
    assert text_cfg.hidden_size // text_cfg.num_attention_heads == 64
    ids = tok.convert_tokens_to_ids
    if name.startswith("qwen"):
        assert cfg.image_token_id == ids("<|image_pad|>")
        assert cfg.video_token_id == ids("<|video_pad|>")
        assert cfg.vision_start_token_id == ids("<|vision_start|>")
        assert cfg.vision_end_token_id == ids("<|vision_end|>")
        assert text_cfg.eos_token_id == tok.eos_token_id == ids("<|im_end|>")
        assert text_cfg.pad_token_id == tok.pad_token_id == ids("<|endoftext|>")
        assert sum(text_cfg.rope_parameters["mrope_section"]) == 32
    else:
        assert cfg.image_token_index == ids("<image>")
        assert text_cfg.bos_token_id == tok.bos_token_id == ids("<s>")
        assert text_cfg.eos_token_id == tok.eos_token_id == ids("</s>")
        assert cfg.pad_token_id == tok.pad_token_id == ids("<pad>")
        assert ids("<unk>") == 0
    # transformers' tokenizer class must tokenize exactly like the trained tokenizer.json.
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    sample = "Describe the picture: what color is the 3rd cat? Ünïcode 😀 text.\nIt's RED!"
    assert tok(sample, add_special_tokens=True)["input_ids"] == raw.encode(sample).ids
    assert tok.decode(raw.encode(sample).ids, skip_special_tokens=True) == sample
    with safe_open(str(path / "model.safetensors"), "np") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)
    assert all(k.startswith(WEIGHT_PREFIXES[name]) for k in keys), keys
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_transformers_generate(paths, name):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = paths[name]
    proc = AutoProcessor.from_pretrained(path)
    model, info = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    model.eval()
    image_token_id = model.config.image_token_id

    def run(question, image):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = proc(text=[text], images=[image], return_tensors="pt")
        n_image_tokens = int((inputs["input_ids"] == image_token_id).sum())
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        return n_image_tokens, out[0, inputs["input_ids"].shape[1]:].tolist()

    imgs = _images(IMAGE_SIZE[name])
    n_red, red = run("What is in the image?", imgs["red"])
    _, noise = run("What is in the image?", imgs["noise"])
    _, red_other_text = run("Describe the colors in this picture.", imgs["red"])
    if name in ("qwen2_5_vl", "qwen2_vl"):
        assert n_red == 256  # 448x448, patch 14, merge 2
    elif name.startswith("qwen3_vl"):
        assert n_red == 196  # 448x448, patch 16, merge 2
    elif name == "llava":
        assert n_red == 576  # 336x336, patch 14
    assert len(red) == 8 and len(set(red)) > 2
    assert red != noise  # the image matters
    assert red != red_other_text  # the text matters
