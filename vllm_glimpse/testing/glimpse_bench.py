"""Synthetic GlimpsePrune checkpoints sized for the bench models (no downloads).

:mod:`vllm_glimpse.testing.bench_models` builds a ~0.31B random-weight Qwen2.5-VL; this module
writes a GlimpsePrune checkpoint that fits it, in the authors' layout (``config.json`` +
``new_modules_gp.pt``, the same generator as :mod:`vllm_glimpse.testing.glimpse_checkpoints`):

* K (``selected_layers`` = ``reduce_layer``) about 60% of the way through the LLM
  (``int(0.6 * L)``, kept below ``L - 1``), as the released checkpoints sit (Qwen2.5-VL-3B:
  23 of 36, 7B: 18 of 28);
* ``selected_visual_layers``: the ViT's full-attention blocks (``fullatt_block_indexes``),
  deepest first, as the released [31, 23, 15, 7] are; ``[depth - 1]`` if the config has none;
* raw attention logits, global VIP attention, the glimpse embedding on every LLM layer (as
  released); the VIP itself is small (the tiny checkpoints' 64-wide fuser).

Random VIP weights decide nothing meaningful, so benchmarks force the keep rule with
``fixed_ratio``.

Cached next to the bench model, ``bench-models/<name>-<BENCH_VERSION>-glimpse-K<K>-<VERSION>``,
built on first use (in a temporary directory, then renamed: safe against concurrent callers).

Command line: ``python -m vllm_glimpse.testing.glimpse_bench [--layer K]`` prints the path.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from vllm_glimpse.testing import tiny_models as _t
from vllm_glimpse.testing.bench_models import BENCH_VERSION, bench_model_path
from vllm_glimpse.testing.glimpse_checkpoints import (
    checkpoint_state,
    common_fields,
    write_checkpoint,
)

__all__ = ["GLIMPSE_BENCH_VERSION", "default_layer", "visual_layers", "bench_checkpoint_config",
           "bench_glimpse_checkpoint", "main"]

#: Bump whenever the generator's output changes, so stale caches are not reused.
GLIMPSE_BENCH_VERSION = "v1"

SEED = 4505


def _read_config(model_dir: pathlib.Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def default_layer(num_layers: int) -> int:
    """K: ``int(0.6 * L)``, below the last two layers (so layers after K remain)."""
    return max(0, min(int(0.6 * num_layers), num_layers - 2))


def visual_layers(vision: dict[str, Any]) -> list[int]:
    """The ViT blocks the VIP reads: the full-attention blocks, deepest first."""
    depth = int(vision["depth"])
    full = [int(i) for i in vision.get("fullatt_block_indexes") or []]
    blocks = sorted({i for i in full if 0 <= i < depth}, reverse=True)
    return blocks or [depth - 1]


class _Text:
    """The text-config fields ``common_fields`` reads, from a plain dict."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.hidden_size = d["hidden_size"]
        self.num_attention_heads = d["num_attention_heads"]
        self.num_hidden_layers = d["num_hidden_layers"]
        self.num_key_value_heads = d["num_key_value_heads"]
        self.rms_norm_eps = d.get("rms_norm_eps", 1e-6)


def bench_checkpoint_config(model_config: dict[str, Any],
                            layer: int | None = None) -> dict[str, Any]:
    """``config.json`` of a GlimpsePrune checkpoint for a Qwen2.5-VL or LLaVA-1.5 model config
    (a dict), in the layout of the authors' releases for that family."""
    model_type = model_config.get("model_type")
    if model_type not in ("qwen2_5_vl", "llava"):
        raise ValueError(f"bench GlimpsePrune checkpoints are made for Qwen2.5-VL and LLaVA-1.5, "
                         f"not {model_type!r}")
    text = _Text(model_config.get("text_config") or model_config)
    vision = model_config["vision_config"]
    K = default_layer(text.num_hidden_layers) if layer is None else layer
    if not 0 <= K < text.num_hidden_layers - 1:
        raise ValueError(f"K = {K} must be in [0, {text.num_hidden_layers - 2}]")
    if model_type == "llava":
        # CLIP hidden states 0..L-1 (the tower is built up to feature layer -2), deepest first,
        # attention log-softmax inputs: as the authors' LLaVA checkpoints.
        clip_layers = int(vision["num_hidden_layers"])
        common = common_fields(text, K, list(range(clip_layers - 1, -1, -2)),
                               use_attention_logits=False)
        return {"architectures": ["LlavaLlamaForCausalLM_GP"], "model_type": "llava_llama_gp",
                "mm_hidden_size": vision["hidden_size"], "mm_vision_select_layer": -2, **common}
    common = common_fields(text, K, visual_layers(vision), use_attention_logits=True)
    return {"architectures": ["Qwen2_5_VL_GP_ForConditionalGeneration"],
            "model_type": "qwen2_5_vl_gp", "num_key_value_heads": text.num_key_value_heads,
            "vision_config": {"hidden_size": vision["hidden_size"], "depth": vision["depth"],
                              "spatial_merge_size": vision.get("spatial_merge_size", 2)},
            "le_norm_type": "rmsnorm", "attn_fuse_global": True, **common}


def bench_glimpse_checkpoint(name: str = "qwen2_5_vl", layer: int | None = None,
                             cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory of the synthetic checkpoint for bench model ``name`` (K = ``layer``, default
    :func:`default_layer`), generated on first use."""
    if name not in ("qwen2_5_vl", "llava"):
        raise ValueError(f"bench GlimpsePrune checkpoints exist for qwen2_5_vl and llava, not {name!r}")
    model_dir = bench_model_path(name, cache_dir)
    model_config = _read_config(model_dir)
    config = bench_checkpoint_config(model_config, layer)
    K = config["reduce_layer"]
    root = pathlib.Path(cache_dir) if cache_dir is not None else _t.default_cache_dir()
    parent = root.expanduser() / "bench-models"
    final = parent / f"{name}-{BENCH_VERSION}-glimpse-K{K}-{GLIMPSE_BENCH_VERSION}"
    if (final / "config.json").is_file() and (final / "new_modules_gp.pt").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp_root = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
    try:
        text = _Text(model_config.get("text_config") or model_config)
        state = checkpoint_state(text.hidden_size, text.num_attention_heads, text.num_hidden_layers,
                                 model_config["vision_config"]["hidden_size"],
                                 len(config["selected_visual_layers"]),
                                 len(config["selected_layers"]), SEED)
        tmp = write_checkpoint(tmp_root / "ckpt", config, state)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if final.exists():  # an incomplete earlier build
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_glimpse.testing.glimpse_bench",
        description="Write the synthetic GlimpsePrune checkpoint for the Qwen2.5-VL bench model; "
                    "print its path and K.")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--layer", type=int, default=None, help="K (default int(0.6 * layers))")
    args = parser.parse_args(argv)
    path = bench_glimpse_checkpoint("qwen2_5_vl", args.layer, args.cache_dir)
    cfg = json.loads((path / "config.json").read_text())
    print(f"{path}\tK {cfg['reduce_layer']} of {cfg['num_hidden_layers']} layers, "
          f"selected_visual_layers {cfg['selected_visual_layers']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
