"""Synthetic GlimpsePrune checkpoints for the tiny models, in the authors' layout.

``config.json`` (the checkpoint fields of docs/design.md §1) + ``new_modules_gp.pt`` (the
``save_new_modules`` keys), random weights at sensible scales. Random VIP weights decide nothing
meaningful, so tests force the keep rule (``fixed_ratio``) or check the decision against the
independent reference on the same weights.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

FUSE, COND, VIP_HEADS = 64, 64, 4

#: Per family: the layer K, the vision layers read (LLaVA: HF hidden_states indices, 2 = the
#: tiny tower's feature layer -2, as 23 is for the real 24-layer tower), raw logits or
#: log-softmax, seed.
TINY_SETUPS = {
    "qwen2_5_vl": dict(K=1, selected_visual_layers=[3, 1], use_attention_logits=True, seed=1),
    "llava": dict(K=2, selected_visual_layers=[2, 1, 0], use_attention_logits=False, seed=2),
}


def checkpoint_state(hidden, heads, layers, vision, n_blocks, n_sel, seed):
    """new_modules_gp.pt content (authors' save_new_modules keys)."""
    g = torch.Generator().manual_seed(seed)

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / in_f ** 0.5, 0.1 * torch.randn(out_f, generator=g)

    fuser = OrderedDict()
    fuser["attn_in_proj.weight"], fuser["attn_in_proj.bias"] = lin(FUSE, n_sel * heads)
    for i in range(n_blocks):
        fuser[f"cond_in_projs.{i}.weight"], fuser[f"cond_in_projs.{i}.bias"] = lin(COND, vision)
    for i in range(n_blocks):
        a = f"layers.{i}."
        fuser[a + "norm1.weight"] = 1 + 0.1 * torch.randn(FUSE, generator=g)
        fuser[a + "norm2.weight"] = 1 + 0.1 * torch.randn(FUSE, generator=g)
        fuser[a + "attn.q_proj.weight"] = lin(FUSE + COND, FUSE + COND)[0]
        fuser[a + "attn.k_proj.weight"] = lin(FUSE + COND, FUSE + COND)[0]
        fuser[a + "attn.v_proj.weight"] = lin(FUSE, FUSE)[0]
        fuser[a + "attn.o_proj.weight"] = lin(FUSE, FUSE)[0]
        for p in ("gate", "up"):
            fuser[a + f"mlp.{p}_proj.weight"], fuser[a + f"mlp.{p}_proj.bias"] = lin(2 * FUSE, FUSE)
        fuser[a + "mlp.down_proj.weight"], fuser[a + "mlp.down_proj.bias"] = lin(FUSE, 2 * FUSE)
    last = n_blocks - 1
    fuser[f"attn_out_projs.{last}.weight"], fuser[f"attn_out_projs.{last}.bias"] = lin(1, FUSE)
    le_w, le_b = lin(hidden, hidden)
    return {
        "attn_fuser": fuser,
        "learnable_embeddings": torch.randn(layers, 1, hidden, generator=g),
        "le_proj": OrderedDict(weight=le_w, bias=le_b),
        "le_norm": OrderedDict(weight=1 + 0.1 * torch.randn(hidden, generator=g)),
    }


def write_checkpoint(directory, config, state) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "new_modules_gp.pt")
    return directory


def common_fields(text, K, selected_visual_layers, use_attention_logits):
    return {
        "hidden_size": text.hidden_size, "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers, "rms_norm_eps": text.rms_norm_eps,
        "selected_layers": [K], "reduce_layer": K, "le_layers": list(range(text.num_hidden_layers)),
        "le_length": 1, "use_attention_logits": use_attention_logits, "attn_fuse_type": "AttnFuserV1",
        "attn_fuse_size": FUSE, "visual_cond_size": COND, "attn_fuse_num_heads": VIP_HEADS,
        "attn_fuse_hidden_act": "silu", "ori_attn_supervision": False, "deep_supervision": False,
        "selected_visual_layers": list(selected_visual_layers), "reduce_threshold": 0.5,
        "min_remain_num": 1, "max_remain_ratio": None, "anchor_positions": [],
    }


def checkpoint_config(family: str, hf_config) -> dict:
    """config.json for a tiny model of ``family`` (its HF config object)."""
    setup = TINY_SETUPS[family]
    text = hf_config.text_config
    common = common_fields(text, setup["K"], setup["selected_visual_layers"], setup["use_attention_logits"])
    if family == "qwen2_5_vl":
        return {"architectures": ["Qwen2_5_VL_GP_ForConditionalGeneration"], "model_type": "qwen2_5_vl_gp",
                "num_key_value_heads": text.num_key_value_heads,
                "vision_config": {"hidden_size": hf_config.vision_config.hidden_size, "depth": 4,
                                  "spatial_merge_size": 2},
                "le_norm_type": "rmsnorm", "attn_fuse_global": True, **common}
    return {"architectures": ["LlavaLlamaForCausalLM_GP"], "model_type": "llava_llama_gp",
            "mm_hidden_size": hf_config.vision_config.hidden_size, "mm_vision_select_layer": -2, **common}


def write_tiny_checkpoint(directory, family: str, hf_config) -> Path:
    """A synthetic checkpoint for the tiny model of ``family`` under ``directory``."""
    setup = TINY_SETUPS[family]
    text = hf_config.text_config
    n_blocks = len(setup["selected_visual_layers"])
    state = checkpoint_state(text.hidden_size, text.num_attention_heads, text.num_hidden_layers,
                             hf_config.vision_config.hidden_size, n_blocks, 1, setup["seed"])
    return write_checkpoint(directory, checkpoint_config(family, hf_config), state)
