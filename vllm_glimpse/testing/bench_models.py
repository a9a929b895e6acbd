"""Bench-size random-weight checkpoints for throughput benchmarks (no downloads).

Same generator style as :mod:`vllm_glimpse.testing.tiny_models` (whose tokenizers, weight
initialiser, weight layouts and chat templates are reused): deterministic, HF hub layout, read by
vLLM's default loader. What differs is the size: the LLM is large enough (~0.3B parameters) that
its prefill over the image tokens dominates the cost on a CPU, while the vision tower keeps the
real token geometry but is shallow and narrow, so that it is cheap next to the LLM (a real
CLIP-L / Qwen ViT would dominate a small LLM and hide what VisionZip saves in the LLM).

* ``llava``: LLaVA-1.5 layout. CLIP 336 px / patch 14 → 576 patches + CLS (4 layers of width
  256; LLaVA reads layer -2, so vLLM builds 3), Llama LLM hidden 1024, 20 layers, 16 heads
  (head_dim 64, MHA as in Llama-2), MLP 3584.
* ``llava_large``: the same with a ~1.37B LLM (hidden 1536, 40 layers, 12 heads of 128, MLP
  5376), for the VisionZip throughput goal (``benchmarks/visionzip_throughput.py``).
* ``qwen2_5_vl``: Qwen2.5-VL layout. ViT patch 14, merge 2 (a 448x448 image → 256 tokens),
  4 blocks of width 256 (window attention, full attention in blocks 1 and 3), Qwen2 LLM hidden
  1024, 22 layers, 16 heads / 2 KV heads (head_dim 64, GQA as in Qwen2.5-VL-3B), MLP 3840.
* ``qwen3_vl``: Qwen3-VL layout. ViT patch 16, merge 2 (a 448x448 image → 196 tokens, 896 →
  784), 4 full-attention blocks of width 256 with DeepStack taps after blocks 0, 1 and 2, Qwen3
  LLM hidden 1024, 22 layers, 16 heads / 2 KV heads (head_dim 64, q/k norms), MLP 3072.

Cached under ``$VLLM_GLIMPSE_CACHE`` (default ``~/.cache/vllm-glimpse``) in
``bench-models/<name>-<version>``; about 1.2 GB each (float32 safetensors; ``llava_large`` 5.5 GB),
written in ~30 s.

Command line: ``python -m vllm_glimpse.testing.bench_models [--cache-dir DIR] [NAME ...]``
prints name, path and parameter counts.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence

from vllm_glimpse.testing import tiny_models as _t

__all__ = ["BENCH_VERSION", "BENCH_MODEL_NAMES", "bench_model_path", "parameter_counts", "main"]

#: Bump whenever the generator's output changes, so stale caches are not reused.
BENCH_VERSION = "v1"

BENCH_MODEL_NAMES = ("llava", "llava_large", "qwen2_5_vl", "qwen3_vl")

LLAVA_LLM = dict(hidden_size=1024, num_hidden_layers=20, num_attention_heads=16,
                 num_key_value_heads=16, intermediate_size=3584)
# ~4.4x the LLM of "llava" (same CLIP; 40 layers as LLaVA-1.5-13B): on this CPU the LLM's time
# grows much less than its size (bf16 matrix products are cheap next to the per-layer
# elementwise work), and the vision tower, which VisionZip cannot skip, must become a small share
# of a VisionZip-64 request before VisionZip can be measured against the limit.
LLAVA_LARGE_LLM = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=12,
                       num_key_value_heads=12, intermediate_size=5376)
LLAVA_CLIP = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                  num_hidden_layers=4)
QWEN_LLM = dict(hidden_size=1024, num_hidden_layers=22, num_attention_heads=16,
                num_key_value_heads=2, intermediate_size=3840)
QWEN_VIT = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                fullatt_block_indexes=[1, 3])
# Qwen3-VL: the same LLM size as "qwen2_5_vl" (Qwen3 layers: q/k norms, no qkv bias), MLP 3072;
# ViT of 4 full-attention blocks with DeepStack taps after blocks 0-2 (the 2B model taps 3 of 24).
QWEN3_LLM = dict(hidden_size=1024, num_hidden_layers=22, num_attention_heads=16,
                 intermediate_size=3072)
QWEN3_VIT = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4,
                 deepstack_visual_indexes=[0, 1, 2])


def _build_llava(out: pathlib.Path, llm: dict | None = None) -> None:
    tok = _t._llama_tokenizer_json()
    vocab = _t._tokenizer_size(tok)
    ids = {t: _t._token_id(tok, t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}
    vision = dict(
        model_type="clip_vision_model", **LLAVA_CLIP, image_size=336, patch_size=14,
        num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=256,
        attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    )
    llm = LLAVA_LLM if llm is None else llm
    text = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, **llm,
        head_dim=llm["hidden_size"] // llm["num_attention_heads"], hidden_act="silu",
        max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.02,
        use_cache=True, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        tie_word_embeddings=False, dtype="float32",
    )
    config = dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava",
        text_config=text, vision_config=vision,
        image_token_index=ids["<image>"], pad_token_id=ids["<pad>"],
        projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", multimodal_projector_bias=True,
        image_seq_length=576, ignore_index=-100, vocab_size=vocab, tie_word_embeddings=False,
        dtype="float32", torch_dtype="float32",
    )
    w = _t._Init(seed=3005)
    hidden = llm["hidden_size"]
    _t._llm_weights(w, "language_model.model", "language_model.lm_head", vocab, hidden,
                    llm["num_hidden_layers"], llm["num_attention_heads"],
                    llm["num_key_value_heads"], llm["intermediate_size"], qkv_bias=False,
                    no_emit=[t["id"] for t in tok["added_tokens"]])
    _t._clip_weights(w, "vision_tower.vision_model", vision)
    w.linear("multi_modal_projector.linear_1", hidden, vision["hidden_size"], True)
    w.linear("multi_modal_projector.linear_2", hidden, hidden, True)

    proc_class = "LlavaProcessor"
    _t._write_json(out / "config.json", config)
    _t._save_safetensors(out / "model.safetensors", w.tensors)
    _t._write_json(out / "generation_config.json", dict(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]))
    _t._write_json(out / "tokenizer.json", tok)
    _t._write_json(out / "tokenizer_config.json", dict(
        tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
        add_prefix_space=None, legacy=False, bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", clean_up_tokenization_spaces=False,
        model_max_length=4096, padding_side="left", sp_model_kwargs={},
        use_default_system_prompt=False, added_tokens_decoder=_t._added_tokens_decoder(tok),
        additional_special_tokens=["<image>"], extra_special_tokens={"image_token": "<image>"},
        processor_class=proc_class, chat_template=_t.LLAVA_CHAT_TEMPLATE,
    ))
    _t._write_json(out / "chat_template.json", {"chat_template": _t.LLAVA_CHAT_TEMPLATE})
    _t._write_json(out / "preprocessor_config.json", dict(
        crop_size={"height": 336, "width": 336}, do_center_crop=True, do_convert_rgb=True,
        do_normalize=True, do_rescale=True, do_resize=True, image_mean=_t._CLIP_MEAN,
        image_std=_t._CLIP_STD, resample=3, rescale_factor=1 / 255,
        size={"shortest_edge": 336}, processor_class=proc_class,
        image_processor_type="CLIPImageProcessor",
    ))
    _t._write_json(out / "processor_config.json", dict(
        image_token="<image>", num_additional_image_tokens=1, patch_size=14,
        processor_class=proc_class, vision_feature_select_strategy="default"))


def _build_qwen2_5_vl(out: pathlib.Path) -> None:
    tok = _t._qwen_tokenizer_json()
    vocab = _t._tokenizer_size(tok)
    ids = {t: _t._token_id(tok, t) for t, _ in _t._QWEN_ADDED_TOKENS}
    llm = QWEN_LLM
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    vision = dict(
        **QWEN_VIT, hidden_act="silu", in_chans=3, in_channels=3,
        out_hidden_size=llm["hidden_size"], patch_size=14, spatial_merge_size=2,
        spatial_patch_size=14, temporal_patch_size=2, window_size=112, tokens_per_second=2,
        initializer_range=0.02, model_type="qwen2_5_vl_vision",
    )
    # M-RoPE sections (t, h, w) sum to head_dim / 2 (Qwen2.5-VL: 16, 24, 24 of 64).
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    rope = {"rope_type": "default", "mrope_section": mrope, "rope_theta": 1000000.0}
    text = dict(
        model_type="qwen2_5_vl_text", vocab_size=vocab, **llm, hidden_act="silu",
        max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-6,
        use_cache=True, use_sliding_window=False, sliding_window=None,
        max_window_layers=llm["num_hidden_layers"], attention_dropout=0.0,
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
    w = _t._Init(seed=3505)
    _t._llm_weights(w, "model", "lm_head", vocab, llm["hidden_size"], llm["num_hidden_layers"],
                    llm["num_attention_heads"], llm["num_key_value_heads"],
                    llm["intermediate_size"], qkv_bias=True, no_emit=sorted(ids.values()))
    _t._qwen_vision_weights(w, vision)

    _t._write_json(out / "config.json", config)
    _t._save_safetensors(out / "model.safetensors", w.tensors)
    _t._write_json(out / "generation_config.json", dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"]))
    _t._write_json(out / "tokenizer.json", tok)
    _t._write_json(out / "tokenizer_config.json", dict(
        tokenizer_class="Qwen2Tokenizer", add_prefix_space=False, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        errors="replace", clean_up_tokenization_spaces=False, split_special_tokens=False,
        model_max_length=8192, padding_side="left",
        added_tokens_decoder=_t._added_tokens_decoder(tok),
        additional_special_tokens=[t for t, special in _t._QWEN_ADDED_TOKENS[1:] if special],
        processor_class="Qwen2_5_VLProcessor", chat_template=_t.QWEN2_5_VL_CHAT_TEMPLATE,
    ))
    _t._write_json(out / "chat_template.json", {"chat_template": _t.QWEN2_5_VL_CHAT_TEMPLATE})
    pix = dict(min_pixels=3136, max_pixels=1003520)
    common = dict(
        do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
        image_mean=_t._CLIP_MEAN, image_std=_t._CLIP_STD, rescale_factor=1 / 255, resample=3,
        patch_size=14, temporal_patch_size=2, merge_size=2, **pix,
        size={"shortest_edge": pix["min_pixels"], "longest_edge": pix["max_pixels"]},
        processor_class="Qwen2_5_VLProcessor",
    )
    _t._write_json(out / "preprocessor_config.json",
                   dict(image_processor_type="Qwen2VLImageProcessor", **common))
    _t._write_json(out / "video_preprocessor_config.json",
                   dict(video_processor_type="Qwen2VLVideoProcessor", **common))


_BUILDERS: dict[str, Callable[[pathlib.Path], None]] = {
    "llava": _build_llava,
    "llava_large": lambda out: _build_llava(out, LLAVA_LARGE_LLM),
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": lambda out: _t._build_qwen3_vl(out, moe=False, llm=QWEN3_LLM, vit=QWEN3_VIT,
                                               seed=3303),
}

# Weight-name prefixes of the parts, per family.
_PARTS = {
    "llava": {"llm": ("language_model.",), "vision": ("vision_tower.",),
              "projector": ("multi_modal_projector.",)},
    "qwen2_5_vl": {"llm": ("model.", "lm_head."), "vision": ("visual.blocks.",
                                                             "visual.patch_embed."),
                   "projector": ("visual.merger.",)},
}
_PARTS["llava_large"] = _PARTS["llava"]
_PARTS["qwen3_vl"] = {
    "llm": ("model.language_model.", "lm_head."),
    "vision": ("model.visual.blocks.", "model.visual.patch_embed.", "model.visual.pos_embed."),
    "projector": ("model.visual.merger.", "model.visual.deepstack_merger_list.")}


def _check_name(name: str) -> None:
    if name not in BENCH_MODEL_NAMES:
        raise ValueError(f"unknown bench model {name!r}; valid names: "
                         f"{', '.join(BENCH_MODEL_NAMES)}")


def bench_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory of the bench checkpoint ``name`` (one of :data:`BENCH_MODEL_NAMES`), generated
    on first use; safe against concurrent callers (built in a temporary directory, renamed)."""
    _check_name(name)
    root = pathlib.Path(cache_dir) if cache_dir is not None else _t.default_cache_dir()
    parent = root.expanduser() / "bench-models"
    final = parent / f"{name}-{BENCH_VERSION}"
    if (final / "config.json").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-{BENCH_VERSION}.", dir=parent))
    try:
        _BUILDERS[name](tmp)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def parameter_counts(name: str, path: str | os.PathLike) -> dict[str, int]:
    """Parameters per part (llm, vision, projector, total), read from the safetensors header."""
    _check_name(name)
    header_path = pathlib.Path(path) / "model.safetensors"
    with open(header_path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    counts = {part: 0 for part in _PARTS[name]}
    counts["total"] = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for d in meta["shape"]:
            n *= d
        counts["total"] += n
        for part, prefixes in _PARTS[name].items():
            if key.startswith(prefixes):
                counts[part] += n
                break
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_glimpse.testing.bench_models",
        description="Generate bench-size random-weight VLM checkpoints; print name, path and "
                    "parameter counts.")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models (default: all of {', '.join(BENCH_MODEL_NAMES)})")
    args = parser.parse_args(argv)
    for n in args.names:
        if n not in BENCH_MODEL_NAMES:
            parser.error(f"unknown bench model {n!r}; valid: {', '.join(BENCH_MODEL_NAMES)}")
    for n in args.names or BENCH_MODEL_NAMES:
        path = bench_model_path(n, args.cache_dir)
        counts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in parameter_counts(n, path).items())
        print(f"{n}\t{path}\t{counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
