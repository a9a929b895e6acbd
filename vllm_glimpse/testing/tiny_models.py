"""Tiny random-weight vision-language checkpoints for tests (no downloads).

``tiny_model_path(name)`` returns a directory holding a complete Hugging Face style checkpoint
(config, float32 safetensors in the official hub layout, a BPE tokenizer trained here on an
embedded corpus, chat template, processor configs) that both ``transformers`` and vLLM's default
weight loader read. Generation is deterministic (fixed seeds, numpy RNG), takes well under a
second per model and imports neither torch nor transformers. Results are cached under
``$VLLM_GLIMPSE_CACHE`` (default ``~/.cache/vllm-glimpse``) in ``tiny-models/<name>-<version>``;
bump :data:`FIXTURE_VERSION` whenever anything below changes the files written.

Families (all LLMs use head_dim 64, which vLLM's CPU attention accepts):

* ``qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration``. Weights named as in
  ``Qwen/Qwen2.5-VL-*-Instruct`` (``model.layers.*``, ``lm_head``, ``visual.*``). A 448x448 image
  gives 256 image tokens.
* ``llava``: ``LlavaForConditionalGeneration`` in the ``llava-hf/llava-1.5-7b-hf`` layout
  (``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.vision_model.*``,
  ``multi_modal_projector.*``); transformers 5 ``save_pretrained`` would write a naming vLLM
  rejects, so the safetensors are written here directly. A 336x336 image gives 576 tokens.
* ``llava_next``: ``LlavaNextForConditionalGeneration`` in the ``llava-hf/llava-v1.6-vicuna``
  layout (plus ``image_newline``), anyres grid pinpoints up to 1008 px.

Weights are scaled so that the tiny models are *discriminative*: greedy continuations depend on
the image and the text. The output rows of ``lm_head`` for every added/special token are zero, so
greedy decoding never emits EOS, image placeholders or chat markers: generations always run to
``max_tokens`` and compare token for token.

Command line: ``python -m vllm_glimpse.testing.tiny_models [--cache-dir DIR] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["FIXTURE_VERSION", "MODEL_NAMES", "tiny_model_path", "generate", "main"]

#: Bump whenever the generator's output changes, so stale caches are not reused.
FIXTURE_VERSION = "v1"

MODEL_NAMES = ("qwen2_5_vl", "llava", "llava_next", "qwen3_vl", "qwen2_vl", "qwen3_vl_moe")

_CACHE_ENV = "VLLM_GLIMPSE_CACHE"

# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

_COLORS = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "gray", "golden", "silver", "dark", "light", "bright", "pale",
)
_OBJECTS = (
    "cat", "dog", "car", "tree", "house", "bird", "flower", "ball", "book", "chair", "table",
    "cup", "boat", "horse", "apple", "banana", "clock", "lamp", "window", "door", "road",
    "mountain", "river", "sky", "cloud", "sun", "moon", "person", "man", "woman", "child",
    "bicycle", "bus", "train", "plane", "phone", "computer", "shirt", "hat", "shoe", "bag",
    "box", "bottle", "plate", "kite", "fish", "sign", "building", "bridge", "street", "field",
    "garden", "beach", "wall", "floor", "letter", "number", "chart", "table", "document",
    "elephant", "rabbit", "turtle", "monkey", "sandwich", "pizza", "guitar", "piano", "camera",
    "umbrella", "jacket", "pencil", "ladder", "basket", "candle", "mirror", "pillow", "blanket",
    "truck", "tractor", "helmet", "sheep", "cow", "duck", "butterfly", "snowman", "castle",
    "lighthouse", "statue", "fountain", "market", "kitchen", "office", "stadium", "painting",
)
_ADJECTIVES = (
    "small", "large", "big", "tiny", "old", "new", "round", "square", "tall", "short",
    "happy", "quiet", "busy", "empty", "full", "wooden", "metal", "soft", "striped", "shiny",
    "blurry", "sharp", "noisy", "smooth", "simple", "strange", "beautiful", "famous",
    "ancient", "modern", "colorful", "crowded", "narrow", "wide", "heavy", "fragile", "frozen",
    "wet", "dry", "dusty", "clean", "broken", "curious", "sleepy", "friendly", "distant",
)
_VERBS = (
    "sits", "stands", "runs", "flies", "rests", "waits", "sleeps", "plays", "moves", "shines",
    "hangs", "lies", "grows", "floats", "jumps", "walks", "looks", "appears", "leans",
    "is sitting", "is standing", "is running", "is flying", "is sleeping", "was parked",
    "was painted", "is covered", "is holding", "is reflected", "climbs", "swims", "glows",
)
_PLACES = (
    "on the table", "near the window", "in the garden", "under the tree", "on the road",
    "in the sky", "next to the house", "behind the door", "at the beach", "in the corner",
    "on the left", "on the right", "at the top", "at the bottom", "in the center",
    "in the background", "in the foreground", "by the river", "on the wall", "on the floor",
)
_NUMBERS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "twenty", "thirty", "hundred", "thousand", "first", "second", "third",
)
_QUESTIONS = (
    "What is in the image?",
    "What color is the {o}?",
    "Describe the picture in detail.",
    "Describe this image.",
    "How many {o}s are there in the picture?",
    "Where is the {o}?",
    "What is the {a} {o} doing?",
    "Is there a {c} {o} in the image?",
    "Which object is {c}?",
    "Can you read the number on the {o}?",
    "What does the sign say?",
    "Why is the {o} {c}?",
    "Who is standing next to the {o}?",
    "When was this photo taken?",
    "What is the main color of the picture?",
    "Please describe the colors and shapes you can see.",
)
_ANSWERS = (
    "The image shows a {a} {c} {o} {p}.",
    "There are {n} {o}s {p}.",
    "A {c} {o} {v} {p}, and a {a2} {o2} {v2} {p2}.",
    "The {o} is {c} and the {o2} is {c2}.",
    "In this picture, the {a} {o} {v} {p}.",
    "I can see {n} {c} {o}s and one {a2} {o2}.",
    "The main color is {c}, with some {c2} near the {o}.",
    "The number on the {o} is {d}.",
    "It is a photo of a {a} {o} with a {c} background.",
    "The {o} {v} while the {o2} {v2} {p2}.",
    "Yes, there is a {c} {o} {p}.",
    "No, the {o} is not {c}; it is {c2}.",
)
_FIXED_TEXT = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe what you see: shapes, colors, numbers, text and people. The image is 448 pixels wide
and 336 pixels tall. Count the objects: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 20, 50, 100.
What time is it? It is 3:45 in the afternoon. The price is $12.99 and the total is 100%.
User: Hello! Assistant: Hi, how can I help you today? Please answer the question briefly.
The red square is above the blue circle, and the green triangle is to the right of them.
Images, pictures, photos and drawings can be described with words about color and position.
Scientists measured the temperature every morning; it was colder in January than in July.
My grandmother baked bread, cookies and a chocolate cake for the birthday celebration.
The orchestra played quietly while the audience listened, whispered and finally applauded.
Engineers designed a lighter engine, reducing fuel consumption by nearly fifteen percent.
Children were laughing, singing and dancing around the fountain in the crowded square.
Our neighbours' kitchen smelled of garlic, onions, pepper, tomatoes and fresh basil.
The museum displays ancient pottery, paintings, sculptures, coins and handwritten letters.
Although the weather forecast promised sunshine, heavy rain flooded several villages.
She carefully opened the envelope, unfolded the map and traced the route with her finger.
Students asked thoughtful questions about history, geography, mathematics and chemistry.
The doctor recommended drinking water, sleeping eight hours and walking every evening.
Farmers harvested wheat, corn, potatoes and carrots before the first autumn frost arrived.
An elephant, a giraffe, a zebra and two lions were resting in the shade near the lake.
Please translate this sentence, summarize the paragraph and explain the difference.
The train departed at seven o'clock, stopped twice, and arrived twenty minutes late.
Thunder rumbled over the hills; lightning briefly illuminated the abandoned farmhouse.
Volunteers collected plastic bottles, cardboard boxes and broken glass from the beach.
The photographer adjusted the camera, focused the lens and captured a perfect sunset.
Customers compared prices, tasted samples and eventually bought cheese, honey and jam.
Mountains, valleys, forests, deserts, oceans and islands appear on the colorful globe.
Write a short story about a curious robot who discovers music in an empty warehouse.
Penguins cannot fly, but they swim remarkably fast through the freezing southern ocean.
The keyboard, monitor, mouse and speakers are connected to the computer under the desk.
During the festival, lanterns glowed yellow, orange and crimson above the narrow streets.
Gardeners planted tulips, roses, daisies and sunflowers along the winding stone path.
Is the answer correct? Explain your reasoning step by step and give the final result.
"""


def _corpus() -> list[str]:
    """A few dozen KB of varied English sentences (deterministic)."""
    rng = random.Random(1234)
    lines = _FIXED_TEXT.splitlines()
    for _ in range(700):
        fill = {
            "c": rng.choice(_COLORS), "c2": rng.choice(_COLORS),
            "o": rng.choice(_OBJECTS), "o2": rng.choice(_OBJECTS),
            "a": rng.choice(_ADJECTIVES), "a2": rng.choice(_ADJECTIVES),
            "v": rng.choice(_VERBS), "v2": rng.choice(_VERBS),
            "p": rng.choice(_PLACES), "p2": rng.choice(_PLACES),
            "n": rng.choice(_NUMBERS), "d": str(rng.randrange(0, 2000)),
        }
        q = rng.choice(_QUESTIONS).format(**fill)
        a = rng.choice(_ANSWERS).format(**fill)
        a = a[0].upper() + a[1:]
        lines.append(f"{q} {a}" if rng.random() < 0.5 else f"{q}\n{a}")
    return lines


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

# Same pre-tokenizer regex as transformers' Qwen2Tokenizer (and Qwen's tokenizer.json).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# (token, special) in Qwen2.5-VL's order (ids 151643.. in the official tokenizer).
_QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# Upper bounds: with min_frequency 2 the corpus yields 1083 byte-level BPE tokens (1105 with the
# added tokens) for Qwen and 1428 Llama-style tokens (+ <image>, <pad> = 1430).
_QWEN_BPE_VOCAB = 1500
_LLAMA_BPE_VOCAB = 1500


def _added_token_json(tid: int, content: str, special: bool) -> dict:
    return {
        "id": tid, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": special,
    }


def _qwen_tokenizer_json() -> dict:
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_QWEN_BPE_VOCAB, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    base = len(vocab)
    data["added_tokens"] = [
        _added_token_json(base + i, t, special) for i, (t, special) in enumerate(_QWEN_ADDED_TOKENS)
    ]
    return data


def _llama_tokenizer_json() -> dict:
    """Llama/SentencePiece-style BPE: <unk> <s> </s>, 256 byte-fallback tokens, then merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Train on words (split=True) so no merge crosses a word boundary; the saved tokenizer uses
    # split=False like transformers' LlamaTokenizer, which tokenizes identically with these merges.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=_LLAMA_BPE_VOCAB - 256, min_frequency=2, show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>"],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = [t for t, _ in trained[:3]]
    assert specials == ["<unk>", "<s>", "</s>"], specials
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in trained[3:]]
    data["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    data["model"]["byte_fallback"] = True
    data["model"]["fuse_unk"] = True
    data["normalizer"] = None
    n = len(tokens)
    data["added_tokens"] = [
        _added_token_json(0, "<unk>", True), _added_token_json(1, "<s>", True),
        _added_token_json(2, "</s>", True),
        _added_token_json(n, "<image>", True), _added_token_json(n + 1, "<pad>", True),
    ]
    return data


def _tokenizer_size(tok_json: dict) -> int:
    ids = list(tok_json["model"]["vocab"].values()) + [t["id"] for t in tok_json["added_tokens"]]
    return max(ids) + 1


def _token_id(tok_json: dict, token: str) -> int:
    for t in tok_json["added_tokens"]:
        if t["content"] == token:
            return t["id"]
    return tok_json["model"]["vocab"][token]


def _added_tokens_decoder(tok_json: dict) -> dict:
    return {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                          "single_word", "special")}
        for t in tok_json["added_tokens"]
    }


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

# Qwen/Qwen2.5-VL-*-Instruct chat_template.json
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5-7b-hf and llava-hf/llava-v1.6-vicuna-7b-hf chat_template.json
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


class _Init:
    """Deterministic float32 tensors; every tensor draws from its own name-seeded stream, so
    adding a tensor never changes the values of the others."""

    def __init__(self, seed: int):
        self.seed = seed
        self.tensors: dict[str, np.ndarray] = {}

    def _rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def normal(self, name: str, shape: Sequence[int], std: float, mean: float = 0.0) -> None:
        a = self._rng(name).standard_normal(tuple(shape), dtype=np.float32) * np.float32(std)
        self.tensors[name] = (a + np.float32(mean)).astype(np.float32)

    def linear(self, prefix: str, out_f: int, in_f: int, bias: bool, gain: float = 1.0,
               bias_std: float = 0.1) -> None:
        self.normal(prefix + ".weight", (out_f, in_f), gain / np.sqrt(in_f))
        if bias:
            self.normal(prefix + ".bias", (out_f,), bias_std)

    def norm(self, prefix: str, dim: int, bias: bool) -> None:
        self.normal(prefix + ".weight", (dim,), 0.1, mean=1.0)
        if bias:
            self.normal(prefix + ".bias", (dim,), 0.1)


def _llm_weights(w: _Init, prefix: str, lm_head: str, vocab: int, hidden: int, layers: int,
                 heads: int, kv_heads: int, inter: int, qkv_bias: bool, no_emit: Sequence[int]):
    head_dim = hidden // heads
    w.normal(f"{prefix}.embed_tokens.weight", (vocab, hidden), _EMBED_STD)
    for i in range(layers):
        p = f"{prefix}.layers.{i}"
        w.linear(f"{p}.self_attn.q_proj", heads * head_dim, hidden, qkv_bias, gain=_QK_GAIN)
        w.linear(f"{p}.self_attn.k_proj", kv_heads * head_dim, hidden, qkv_bias, gain=_QK_GAIN)
        w.linear(f"{p}.self_attn.v_proj", kv_heads * head_dim, hidden, qkv_bias)
        w.linear(f"{p}.self_attn.o_proj", hidden, heads * head_dim, False)
        w.linear(f"{p}.mlp.gate_proj", inter, hidden, False)
        w.linear(f"{p}.mlp.up_proj", inter, hidden, False)
        w.linear(f"{p}.mlp.down_proj", hidden, inter, False)
        w.norm(f"{p}.input_layernorm", hidden, False)
        w.norm(f"{p}.post_attention_layernorm", hidden, False)
    w.norm(f"{prefix}.norm", hidden, False)
    w.linear(lm_head, vocab, hidden, False, gain=_LM_HEAD_GAIN)
    # Special / added tokens are never the greedy choice: their logit is exactly 0 while the
    # maximum over ~1.5k random logits is several standard deviations above 0.
    w.tensors[lm_head + ".weight"][list(no_emit)] = 0.0


_LM_HEAD_GAIN = 4.0
_QK_GAIN = 3.0
_EMBED_STD = 1.0
_VIT_QK_GAIN = 2.0


def _qwen_vision_weights(w: _Init, v: dict) -> None:
    h, inter, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    m = h * v["spatial_merge_size"] ** 2
    w.normal("visual.patch_embed.proj.weight",
             (h, v["in_chans"], v["temporal_patch_size"], v["patch_size"], v["patch_size"]),
             1.0 / np.sqrt(v["in_chans"] * v["temporal_patch_size"] * v["patch_size"] ** 2))
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}"
        w.norm(f"{p}.norm1", h, False)
        w.norm(f"{p}.norm2", h, False)
        w.linear(f"{p}.attn.qkv", 3 * h, h, True)
        w.tensors[f"{p}.attn.qkv.weight"][: 2 * h] *= _VIT_QK_GAIN
        w.linear(f"{p}.attn.proj", h, h, True)
        w.linear(f"{p}.mlp.gate_proj", inter, h, True)
        w.linear(f"{p}.mlp.up_proj", inter, h, True)
        w.linear(f"{p}.mlp.down_proj", h, inter, True)
    w.norm("visual.merger.ln_q", h, False)
    w.linear("visual.merger.mlp.0", m, m, True)
    w.linear("visual.merger.mlp.2", out, m, True)


def _clip_weights(w: _Init, prefix: str, v: dict) -> None:
    h, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n_pos = (v["image_size"] // p) ** 2 + 1
    e = f"{prefix}.embeddings"
    w.normal(f"{e}.class_embedding", (h,), 1.0)
    w.normal(f"{e}.patch_embedding.weight", (h, 3, p, p), 1.0 / np.sqrt(3 * p * p))
    w.normal(f"{e}.position_embedding.weight", (n_pos, h), 0.5)
    w.norm(f"{prefix}.pre_layrnorm", h, True)
    for i in range(v["num_hidden_layers"]):
        q = f"{prefix}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            gain = _VIT_QK_GAIN if proj in ("q_proj", "k_proj") else 1.0
            w.linear(f"{q}.self_attn.{proj}", h, h, True, gain=gain)
        w.norm(f"{q}.layer_norm1", h, True)
        w.norm(f"{q}.layer_norm2", h, True)
        w.linear(f"{q}.mlp.fc1", inter, h, True)
        w.linear(f"{q}.mlp.fc2", h, inter, True)
    w.norm(f"{prefix}.post_layernorm", h, True)


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------

_LLM = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n",
                    encoding="utf-8")


def _save_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)}, str(path),
              metadata={"format": "pt"})


def _build_qwen2_5_vl(out: pathlib.Path) -> None:
    tok = _qwen_tokenizer_json()
    vocab = _tokenizer_size(tok)
    ids = {t: _token_id(tok, t) for t, _ in _QWEN_ADDED_TOKENS}
    vision = dict(
        depth=4, hidden_size=128, hidden_act="silu", intermediate_size=256, num_heads=2,
        in_chans=3, in_channels=3, out_hidden_size=_LLM["hidden_size"], patch_size=14,
        spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[1, 3], tokens_per_second=2, initializer_range=0.02,
        model_type="qwen2_5_vl_vision",
    )
    rope = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0}
    text = dict(
        model_type="qwen2_5_vl_text", vocab_size=vocab, **_LLM, num_key_value_heads=2,
        hidden_act="silu", max_position_embeddings=8192, initializer_range=0.02,
        rms_norm_eps=1e-6, use_cache=True, use_sliding_window=False, sliding_window=None,
        max_window_layers=_LLM["num_hidden_layers"], attention_dropout=0.0,
        rope_parameters=rope, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, dtype="float32",
    )
    config = dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], vocab_size=vocab, tie_word_embeddings=False,
        dtype="float32", torch_dtype="float32",
    )
    w = _Init(seed=2505)
    _llm_weights(w, "model", "lm_head", vocab, _LLM["hidden_size"], _LLM["num_hidden_layers"],
                 _LLM["num_attention_heads"], 2, _LLM["intermediate_size"], qkv_bias=True,
                 no_emit=sorted(ids.values()))
    _qwen_vision_weights(w, vision)

    _write_json(out / "config.json", config)
    _save_safetensors(out / "model.safetensors", w.tensors)
    _write_json(out / "generation_config.json", dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"]))
    _write_json(out / "tokenizer.json", tok)
    _write_json(out / "tokenizer_config.json", dict(
        tokenizer_class="Qwen2Tokenizer", add_prefix_space=False, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        errors="replace", clean_up_tokenization_spaces=False, split_special_tokens=False,
        model_max_length=8192, padding_side="left",
        added_tokens_decoder=_added_tokens_decoder(tok),
        additional_special_tokens=[t for t, special in _QWEN_ADDED_TOKENS[1:] if special],
        processor_class="Qwen2_5_VLProcessor", chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    ))
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})
    pix = dict(min_pixels=3136, max_pixels=1003520)
    common = dict(
        do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD, rescale_factor=1 / 255, resample=3,
        patch_size=14, temporal_patch_size=2, merge_size=2, **pix,
        size={"shortest_edge": pix["min_pixels"], "longest_edge": pix["max_pixels"]},
        processor_class="Qwen2_5_VLProcessor",
    )
    _write_json(out / "preprocessor_config.json",
                dict(image_processor_type="Qwen2VLImageProcessor", **common))
    _write_json(out / "video_preprocessor_config.json",
                dict(video_processor_type="Qwen2VLVideoProcessor", **common))


def _build_llava(out: pathlib.Path, next_: bool) -> None:
    tok = _llama_tokenizer_json()
    vocab = _tokenizer_size(tok)
    ids = {t: _token_id(tok, t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}
    vision = dict(
        model_type="clip_vision_model", hidden_size=128, intermediate_size=256,
        num_attention_heads=2, num_hidden_layers=3, image_size=336, patch_size=14,
        num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=256,
        attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    )
    text = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, **_LLM,
        num_key_value_heads=4, head_dim=64, hidden_act="silu", max_position_embeddings=4096,
        rms_norm_eps=1e-5, initializer_range=0.02, use_cache=True, attention_bias=False,
        mlp_bias=False, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        tie_word_embeddings=False, dtype="float32",
    )
    config = dict(
        architectures=["LlavaNextForConditionalGeneration" if next_
                       else "LlavaForConditionalGeneration"],
        model_type="llava_next" if next_ else "llava",
        text_config=text, vision_config=vision,
        image_token_index=ids["<image>"], pad_token_id=ids["<pad>"],
        projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", multimodal_projector_bias=True,
        image_seq_length=576, ignore_index=-100, vocab_size=vocab, tie_word_embeddings=False,
        dtype="float32", torch_dtype="float32",
    )
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    if next_:
        config["image_grid_pinpoints"] = pinpoints
        config["use_image_newline_parameter"] = True

    w = _Init(seed=1006 if next_ else 1005)
    hidden = _LLM["hidden_size"]
    _llm_weights(w, "language_model.model", "language_model.lm_head", vocab, hidden,
                 _LLM["num_hidden_layers"], _LLM["num_attention_heads"], 4,
                 _LLM["intermediate_size"], qkv_bias=False,
                 no_emit=[t["id"] for t in tok["added_tokens"]])
    _clip_weights(w, "vision_tower.vision_model", vision)
    w.linear("multi_modal_projector.linear_1", hidden, vision["hidden_size"], True)
    w.linear("multi_modal_projector.linear_2", hidden, hidden, True)
    if next_:
        w.normal("image_newline", (hidden,), 1.0)

    proc_class = "LlavaNextProcessor" if next_ else "LlavaProcessor"
    _write_json(out / "config.json", config)
    _save_safetensors(out / "model.safetensors", w.tensors)
    _write_json(out / "generation_config.json", dict(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]))
    _write_json(out / "tokenizer.json", tok)
    _write_json(out / "tokenizer_config.json", dict(
        tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
        add_prefix_space=None, legacy=False, bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", clean_up_tokenization_spaces=False,
        model_max_length=4096, padding_side="left", sp_model_kwargs={},
        use_default_system_prompt=False, added_tokens_decoder=_added_tokens_decoder(tok),
        additional_special_tokens=["<image>"], extra_special_tokens={"image_token": "<image>"},
        processor_class=proc_class, chat_template=LLAVA_CHAT_TEMPLATE,
    ))
    _write_json(out / "chat_template.json", {"chat_template": LLAVA_CHAT_TEMPLATE})
    image_proc = dict(
        crop_size={"height": 336, "width": 336}, do_center_crop=True, do_convert_rgb=True,
        do_normalize=True, do_rescale=True, do_resize=True, image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD, resample=3, rescale_factor=1 / 255, size={"shortest_edge": 336},
        processor_class=proc_class,
    )
    if next_:
        image_proc.update(image_processor_type="LlavaNextImageProcessor", do_pad=True,
                          image_grid_pinpoints=pinpoints)
    else:
        image_proc.update(image_processor_type="CLIPImageProcessor")
    _write_json(out / "preprocessor_config.json", image_proc)
    _write_json(out / "processor_config.json", dict(
        image_token="<image>", num_additional_image_tokens=1, patch_size=14,
        processor_class=proc_class, vision_feature_select_strategy="default"))


# Qwen/Qwen3-VL-*-Instruct chat_template.json, abridged: system, user and assistant turns with
# image, video and text parts (the tool-call and reasoning branches are left out). Unlike
# Qwen2.5-VL there is no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}"
    "{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}{%- if add_vision_id %}"
    "{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_QWEN3_VL_MEAN_STD = [0.5, 0.5, 0.5]
_QWEN3_QK_NORM_GAIN = 2.0  # Qwen3-VL's preprocessor_config.json


def _qwen_family_files(out: pathlib.Path, tok: dict, ids: dict, chat_template: str,
                       processor_class: str, image_processor: dict, video_processor: dict
                       ) -> None:
    """Tokenizer, chat template, generation and processor configs of a Qwen-VL checkpoint."""
    _write_json(out / "generation_config.json", dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"]))
    _write_json(out / "tokenizer.json", tok)
    _write_json(out / "tokenizer_config.json", dict(
        tokenizer_class="Qwen2Tokenizer", add_prefix_space=False, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        errors="replace", clean_up_tokenization_spaces=False, split_special_tokens=False,
        model_max_length=8192, padding_side="left",
        added_tokens_decoder=_added_tokens_decoder(tok),
        additional_special_tokens=[t for t, special in _QWEN_ADDED_TOKENS[1:] if special],
        processor_class=processor_class, chat_template=chat_template,
    ))
    _write_json(out / "chat_template.json", {"chat_template": chat_template})
    _write_json(out / "preprocessor_config.json", image_processor)
    _write_json(out / "video_preprocessor_config.json", video_processor)


def _qwen_family_config(arch: str, model_type: str, ids: dict, vocab: int, text: dict,
                        vision: dict) -> dict:
    return dict(
        architectures=[arch], model_type=model_type, text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], vocab_size=vocab, tie_word_embeddings=False,
        dtype="float32", torch_dtype="float32",
    )


_QWEN3_VIT = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=2,
                  deepstack_visual_indexes=[0, 1, 2])


def _build_qwen3_vl(out: pathlib.Path, moe: bool, llm: dict | None = None,
                    vit: dict | None = None, seed: int | None = None) -> None:
    """``Qwen3VLForConditionalGeneration`` in the ``Qwen/Qwen3-VL-*-Instruct`` layout
    (``model.language_model.*``, ``model.visual.*``, ``lm_head``): patch 16, a ViT of
    full-attention blocks with three DeepStack taps, Qwen3 LLM (q/k norms) with interleaved
    M-RoPE. A 448x448 image gives 196 image tokens. ``llm`` / ``vit`` / ``seed``: other sizes
    (the bench models; LLM head_dim 64, 2 KV heads). ``moe``: ``Qwen3VLMoeForConditionalGeneration``
    as ``Qwen/Qwen3-VL-30B-A3B-Instruct``, every LLM layer a mixture of 4 experts (top 2), the
    experts' weights fused per layer as on the hub (``mlp.experts.gate_up_proj`` [E, H, 2I],
    ``mlp.experts.down_proj`` [E, I, H], ``mlp.gate`` the router)."""
    tok = _qwen_tokenizer_json()
    vocab = _tokenizer_size(tok)
    ids = {t: _token_id(tok, t) for t, _ in _QWEN_ADDED_TOKENS}
    llm = _LLM if llm is None else llm
    hidden, heads, head_dim = llm["hidden_size"], llm["num_attention_heads"], 64
    vision = dict(
        model_type="qwen3_vl", **(_QWEN3_VIT if vit is None else vit),
        hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=2304,
        initializer_range=0.02,
    )
    # Qwen3-VL's mrope_section [24, 20, 20] for head_dim 128, halved for head_dim 64.
    rope = {"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True,
            "rope_theta": 5000000.0}
    text = dict(
        model_type="qwen3_vl_text", vocab_size=vocab, **llm, num_key_value_heads=2,
        head_dim=head_dim, hidden_act="silu", max_position_embeddings=8192,
        initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, attention_bias=False,
        attention_dropout=0.0, rope_parameters=rope, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, dtype="float32",
    )
    # 2I != H, so a transposed expert tensor cannot pass for an untransposed one.
    experts, expert_inter = 4, 96
    if moe:
        vision["model_type"] = "qwen3_vl_moe"
        text.update(model_type="qwen3_vl_moe_text", num_experts=experts, num_experts_per_tok=2,
                    moe_intermediate_size=expert_inter, decoder_sparse_step=1,
                    mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001)
    config = _qwen_family_config(
        "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration",
        "qwen3_vl_moe" if moe else "qwen3_vl", ids, vocab, text, vision)
    w = _Init(seed=seed if seed is not None else 3030 if moe else 3003)
    prefix = "model.language_model"
    _llm_weights(w, prefix, "lm_head", vocab, hidden, llm["num_hidden_layers"], heads, 2,
                 llm["intermediate_size"], qkv_bias=False, no_emit=sorted(ids.values()))
    for i in range(llm["num_hidden_layers"]):
        # Qwen3 RMS-normalises each head's q and k, which undoes _QK_GAIN on the projections:
        # the norms' weights carry it instead (sharper attention, a more discriminative model).
        for norm in ("q_norm", "k_norm"):
            w.normal(f"{prefix}.layers.{i}.self_attn.{norm}.weight", (head_dim,),
                     0.1 * _QWEN3_QK_NORM_GAIN, mean=_QWEN3_QK_NORM_GAIN)
        if moe:  # the dense MLP gives way to the router and the fused experts
            p = f"{prefix}.layers.{i}.mlp"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                del w.tensors[f"{p}.{proj}.weight"]
            w.normal(f"{p}.gate.weight", (experts, hidden), 1.0 / np.sqrt(hidden))
            w.normal(f"{p}.experts.gate_up_proj", (experts, hidden, 2 * expert_inter),
                     1.0 / np.sqrt(hidden))
            w.normal(f"{p}.experts.down_proj", (experts, expert_inter, hidden),
                     1.0 / np.sqrt(expert_inter))
    _qwen3_vision_weights(w, "model.visual", vision)

    _write_json(out / "config.json", config)
    _save_safetensors(out / "model.safetensors", w.tensors)
    common = dict(
        do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
        image_mean=_QWEN3_VL_MEAN_STD, image_std=_QWEN3_VL_MEAN_STD, rescale_factor=1 / 255,
        resample=3, patch_size=16, temporal_patch_size=2, merge_size=2,
        processor_class="Qwen3VLProcessor",
    )
    # Smallest image: 64x64 px (4 tokens) as for the other Qwen fixtures, not the hub's 256x256.
    _qwen_family_files(
        out, tok, ids, QWEN3_VL_CHAT_TEMPLATE, "Qwen3VLProcessor",
        dict(image_processor_type="Qwen2VLImageProcessorFast",
             size={"shortest_edge": 4096, "longest_edge": 1048576}, **common),
        dict(video_processor_type="Qwen3VLVideoProcessor", fps=2, do_sample_frames=True,
             size={"shortest_edge": 4096, "longest_edge": 1048576}, **common))


def _qwen3_vision_weights(w: _Init, prefix: str, v: dict) -> None:
    h, inter, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    m = h * v["spatial_merge_size"] ** 2
    p = v["patch_size"]
    w.normal(f"{prefix}.patch_embed.proj.weight",
             (h, v["in_channels"], v["temporal_patch_size"], p, p),
             1.0 / np.sqrt(v["in_channels"] * v["temporal_patch_size"] * p * p))
    w.normal(f"{prefix}.patch_embed.proj.bias", (h,), 0.1)
    w.normal(f"{prefix}.pos_embed.weight", (v["num_position_embeddings"], h), 0.5)
    for i in range(v["depth"]):
        b = f"{prefix}.blocks.{i}"
        w.norm(f"{b}.norm1", h, True)
        w.norm(f"{b}.norm2", h, True)
        w.linear(f"{b}.attn.qkv", 3 * h, h, True)
        w.tensors[f"{b}.attn.qkv.weight"][: 2 * h] *= _VIT_QK_GAIN
        w.linear(f"{b}.attn.proj", h, h, True)
        w.linear(f"{b}.mlp.linear_fc1", inter, h, True)
        w.linear(f"{b}.mlp.linear_fc2", h, inter, True)
    mergers = ["merger"] + [f"deepstack_merger_list.{i}"
                            for i in range(len(v["deepstack_visual_indexes"]))]
    for name in mergers:
        # The DeepStack mergers normalise after the 2x2 shuffle (use_postshuffle_norm).
        w.norm(f"{prefix}.{name}.norm", h if name == "merger" else m, True)
        w.linear(f"{prefix}.{name}.linear_fc1", m, m, True)
        w.linear(f"{prefix}.{name}.linear_fc2", out, m, True)


def _build_qwen2_vl(out: pathlib.Path) -> None:
    """``Qwen2VLForConditionalGeneration`` in the ``Qwen/Qwen2-VL-*-Instruct`` layout
    (``model.*``, ``lm_head``, ``visual.*``): patch 14, a ViT of full-attention blocks (LayerNorm,
    QuickGELU MLP), Qwen2 LLM with M-RoPE. A 448x448 image gives 256 image tokens."""
    tok = _qwen_tokenizer_json()
    vocab = _tokenizer_size(tok)
    ids = {t: _token_id(tok, t) for t, _ in _QWEN_ADDED_TOKENS}
    hidden = _LLM["hidden_size"]
    vision = dict(
        model_type="qwen2_vl", depth=4, embed_dim=128, hidden_size=hidden, hidden_act="quick_gelu",
        mlp_ratio=2, num_heads=2, in_chans=3, in_channels=3, patch_size=14,
        spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2,
        initializer_range=0.02,
    )
    rope = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0}
    text = dict(
        model_type="qwen2_vl_text", vocab_size=vocab, **_LLM, num_key_value_heads=2,
        hidden_act="silu", max_position_embeddings=8192, initializer_range=0.02,
        rms_norm_eps=1e-6, use_cache=True, use_sliding_window=False, sliding_window=None,
        max_window_layers=_LLM["num_hidden_layers"], attention_dropout=0.0,
        rope_parameters=rope, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, dtype="float32",
    )
    config = _qwen_family_config("Qwen2VLForConditionalGeneration", "qwen2_vl", ids, vocab,
                                 text, vision)
    w = _Init(seed=2002)
    _llm_weights(w, "model", "lm_head", vocab, hidden, _LLM["num_hidden_layers"],
                 _LLM["num_attention_heads"], 2, _LLM["intermediate_size"], qkv_bias=True,
                 no_emit=sorted(ids.values()))
    e = vision["embed_dim"]
    m = e * vision["spatial_merge_size"] ** 2
    p = vision["patch_size"]
    w.normal("visual.patch_embed.proj.weight", (e, 3, vision["temporal_patch_size"], p, p),
             1.0 / np.sqrt(3 * vision["temporal_patch_size"] * p * p))
    for i in range(vision["depth"]):
        b = f"visual.blocks.{i}"
        w.norm(f"{b}.norm1", e, True)
        w.norm(f"{b}.norm2", e, True)
        w.linear(f"{b}.attn.qkv", 3 * e, e, True)
        w.tensors[f"{b}.attn.qkv.weight"][: 2 * e] *= _VIT_QK_GAIN
        w.linear(f"{b}.attn.proj", e, e, True)
        w.linear(f"{b}.mlp.fc1", e * vision["mlp_ratio"], e, True)
        w.linear(f"{b}.mlp.fc2", e, e * vision["mlp_ratio"], True)
    w.norm("visual.merger.ln_q", e, True)
    w.linear("visual.merger.mlp.0", m, m, True)
    w.linear("visual.merger.mlp.2", hidden, m, True)

    _write_json(out / "config.json", config)
    _save_safetensors(out / "model.safetensors", w.tensors)
    pix = dict(min_pixels=3136, max_pixels=1003520)
    common = dict(
        do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD, rescale_factor=1 / 255, resample=3,
        patch_size=14, temporal_patch_size=2, merge_size=2, **pix,
        size={"shortest_edge": pix["min_pixels"], "longest_edge": pix["max_pixels"]},
        processor_class="Qwen2VLProcessor",
    )
    _qwen_family_files(
        out, tok, ids, QWEN2_5_VL_CHAT_TEMPLATE, "Qwen2VLProcessor",
        dict(image_processor_type="Qwen2VLImageProcessor", **common),
        dict(video_processor_type="Qwen2VLVideoProcessor", **common))


_BUILDERS: dict[str, Callable[[pathlib.Path], None]] = {
    "qwen2_5_vl": _build_qwen2_5_vl,
    "llava": lambda out: _build_llava(out, next_=False),
    "llava_next": lambda out: _build_llava(out, next_=True),
    "qwen3_vl": lambda out: _build_qwen3_vl(out, moe=False),
    "qwen3_vl_moe": lambda out: _build_qwen3_vl(out, moe=True),
    "qwen2_vl": lambda out: _build_qwen2_vl(out),
}

# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get(_CACHE_ENV)
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "vllm-glimpse"


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def generate(name: str, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write the checkpoint ``name`` into ``out_dir`` (created; must not hold other files)."""
    _check_name(name)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _BUILDERS[name](out)
    return out


def tiny_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory of the tiny checkpoint ``name`` (one of :data:`MODEL_NAMES`), generated on
    first use. Safe against concurrent callers: built in a temporary directory and renamed."""
    _check_name(name)
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parent = root.expanduser() / "tiny-models"
    final = parent / f"{name}-{FIXTURE_VERSION}"
    if (final / "config.json").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-{FIXTURE_VERSION}.", dir=parent))
    try:
        generate(name, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race (target exists and is non-empty).
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_glimpse.testing.tiny_models",
        description="Generate tiny random-weight VLM checkpoints and print name<TAB>path.")
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache root (default: ${_CACHE_ENV} or ~/.cache/vllm-glimpse)")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to generate (default: all of {', '.join(MODEL_NAMES)})")
    args = parser.parse_args(argv)
    names = args.names or list(MODEL_NAMES)
    for n in names:
        if n not in MODEL_NAMES:
            parser.error(f"unknown tiny model {n!r}; valid names: {', '.join(MODEL_NAMES)}")
    for n in names:
        print(f"{n}\t{tiny_model_path(n, args.cache_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
