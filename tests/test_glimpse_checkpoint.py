"""Loading GlimpsePrune checkpoints: strict round trip of a synthetic checkpoint written with the
authors' key names (HVision-NKU/GlimpsePrune ``save_new_modules``: torch.save of
{"attn_fuser": state_dict, "learnable_embeddings": tensor, "le_proj": state_dict, "le_norm":
state_dict}) at tiny sizes, config overrides, and every error case."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

from vllm_glimpse.glimpse import (
    LLAVA,
    QWEN,
    load_glimpse_checkpoint,
    parse_glimpse_config,
    read_glimpse_config,
)
from vllm_glimpse.settings import GlimpseSettings, PruningSettingsError

HIDDEN, HEADS, LAYERS, VISION = 256, 4, 4, 128
FUSE, COND, VIP_HEADS = 64, 64, 4  # q/k heads of 32, v heads of 16


def qwen_base(hidden=HIDDEN, heads=HEADS, layers=LAYERS, vision=VISION):
    """A base config as vLLM hands it over (transformers 5: text fields under text_config)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                         num_key_value_heads=2, intermediate_size=512, rms_norm_eps=1e-6),
        vision_config=dict(hidden_size=vision, depth=4, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[1, 3]),
    )


def llava_base(hidden=HIDDEN, heads=HEADS, layers=LAYERS, vision=VISION):
    return {"model_type": "llava",
            "text_config": {"hidden_size": hidden, "num_attention_heads": heads,
                            "num_hidden_layers": layers, "rms_norm_eps": 1e-5},
            "vision_config": {"hidden_size": vision, "num_hidden_layers": 24}}


def qwen_ckpt_config(**over):
    """config.json as the authors' save_pretrained (transformers 4.51) writes it: base fields at
    top level, vision_config nested, plus the GlimpsePrune fields."""
    cfg = {
        "architectures": ["Qwen2_5_VL_GP_ForConditionalGeneration"], "model_type": "qwen2_5_vl_gp",
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "vision_config": {"hidden_size": VISION, "depth": 4, "spatial_merge_size": 2},
        "selected_layers": [2], "reduce_layer": 2, "le_layers": list(range(LAYERS)), "le_length": 1,
        "le_dropout_prob": 0.0, "le_norm_type": "rmsnorm", "use_attention_logits": True,
        "attn_fuse_type": "AttnFuserV1", "attn_fuse_size": FUSE, "visual_cond_size": COND,
        "attn_fuse_num_heads": VIP_HEADS, "attn_fuse_hidden_act": "silu", "attn_fuse_global": True,
        "ori_attn_supervision": False, "deep_supervision": False, "selected_visual_layers": [3, 1],
        "reduce_threshold": 0.5, "use_ref_masks": False, "use_zero_masks": False,
        "anchor_positions": [], "min_remain_num": 1, "max_remain_ratio": None,
    }
    cfg.update(over)
    return cfg


def llava_ckpt_config(**over):
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM_GP"], "model_type": "llava_llama_gp",
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "rms_norm_eps": 1e-5, "mm_hidden_size": VISION, "mm_vision_select_layer": -2,
        "selected_layers": [3], "reduce_layer": 3, "le_layers": list(range(LAYERS)), "le_length": 1,
        "use_attention_logits": False, "attn_fuse_type": "AttnFuserV1", "attn_fuse_size": FUSE,
        "visual_cond_size": COND, "attn_fuse_num_heads": VIP_HEADS, "attn_fuse_hidden_act": "silu",
        "ori_attn_supervision": False, "deep_supervision": False,
        "selected_visual_layers": [23, 17, 11, 5], "reduce_threshold": 0.5, "min_remain_num": 1,
        "max_remain_ratio": None, "anchor_positions": [],
    }
    cfg.update(over)
    return cfg


def authors_state(n_blocks=2, hidden=HIDDEN, heads=HEADS, layers=LAYERS, vision=VISION, n_sel=1,
                  dtype=torch.bfloat16, seed=0):
    """new_modules_gp.pt content, keys and shapes spelled out from the authors' modules."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    fuser = OrderedDict()
    fuser["attn_in_proj.weight"], fuser["attn_in_proj.bias"] = r(FUSE, n_sel * heads), r(FUSE)
    for i in range(n_blocks):
        fuser[f"cond_in_projs.{i}.weight"], fuser[f"cond_in_projs.{i}.bias"] = r(COND, vision), r(COND)
    for i in range(n_blocks):
        a = f"layers.{i}."
        fuser[a + "norm1.weight"], fuser[a + "norm2.weight"] = r(FUSE), r(FUSE)
        fuser[a + "attn.q_proj.weight"] = r(FUSE + COND, FUSE + COND)
        fuser[a + "attn.k_proj.weight"] = r(FUSE + COND, FUSE + COND)
        fuser[a + "attn.v_proj.weight"], fuser[a + "attn.o_proj.weight"] = r(FUSE, FUSE), r(FUSE, FUSE)
        for p in ("gate", "up"):
            fuser[a + f"mlp.{p}_proj.weight"] = r(2 * FUSE, FUSE)
            fuser[a + f"mlp.{p}_proj.bias"] = r(2 * FUSE)
        fuser[a + "mlp.down_proj.weight"], fuser[a + "mlp.down_proj.bias"] = r(FUSE, 2 * FUSE), r(FUSE)
    last = n_blocks - 1
    fuser[f"attn_out_projs.{last}.weight"], fuser[f"attn_out_projs.{last}.bias"] = r(1, FUSE), r(1)
    return {
        "attn_fuser": fuser,
        "learnable_embeddings": r(layers, 1, hidden),
        "le_proj": OrderedDict(weight=r(hidden, hidden), bias=r(hidden)),
        "le_norm": OrderedDict(weight=r(hidden)),
    }


def write(tmp_path, config=None, state=None, name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    if config is not False:
        (d / "config.json").write_text(json.dumps(config or qwen_ckpt_config()))
    if state is not False:
        torch.save(state if state is not None else authors_state(), d / "new_modules_gp.pt")
    return d


@pytest.fixture(scope="module")
def qbase():
    return qwen_base()


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


def test_qwen_round_trip_is_strict_and_exact(tmp_path, qbase):
    state = authors_state()
    d = write(tmp_path, state=state)
    ck = load_glimpse_checkpoint(str(d), qbase)
    cfg = ck.config
    assert cfg.family == QWEN and ck.directory == d
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.vision_hidden_size) == (
        HIDDEN, HEADS, LAYERS, VISION)
    assert cfg.selected_layers == (2,) and cfg.reduce_layer == 2
    assert cfg.selected_visual_layers == (3, 1) and cfg.use_attention_logits is True
    assert cfg.attn_fuse_global is True and cfg.le_layers == (0, 1, 2, 3)
    assert cfg.keep_rule.threshold == 0.5 and cfg.keep_rule.min_remain_num == 1
    assert cfg.keep_rule.max_remain_ratio is None and cfg.keep_rule.fixed_remain_ratio is None
    sd = ck.predictor.state_dict()
    flat = {f"attn_fuser.{k}": v for k, v in state["attn_fuser"].items()}
    flat["learnable_embeddings"] = state["learnable_embeddings"]
    flat.update({f"le_proj.{k}": v for k, v in state["le_proj"].items()})
    flat["le_norm.weight"] = state["le_norm"]["weight"]
    assert set(sd) == set(flat)
    for k, v in flat.items():
        assert sd[k].dtype == torch.bfloat16  # the checkpoint's dtype by default
        assert torch.equal(sd[k], v), k
    assert not ck.predictor.training
    # it runs: one logit per image token
    n = 12
    with torch.no_grad():
        out = ck.predictor(torch.randn(n, HEADS), [torch.randn(n, VISION)] * 2, [(3, 4)])
    assert out.shape == (n,)
    emb = ck.predictor.glimpse_embedding(0)
    assert emb.shape == (1, HIDDEN) and emb.dtype == torch.bfloat16


def test_dtype_argument_and_dict_base_config(tmp_path):
    d = write(tmp_path)
    base = {"model_type": "qwen2_5_vl",
            "text_config": {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS},
            "vision_config": {"hidden_size": VISION, "depth": 4}}
    ck = load_glimpse_checkpoint(d, base, dtype=torch.float32)
    assert ck.predictor.attn_fuser.attn_in_proj.weight.dtype == torch.float32
    assert ck.predictor.attn_fuser.rotary.inv_freq.dtype == torch.float32


def test_llava_round_trip(tmp_path):
    d = write(tmp_path, llava_ckpt_config(), authors_state(n_blocks=4))
    ck = load_glimpse_checkpoint(d, llava_base())
    cfg = ck.config
    assert cfg.family == LLAVA and cfg.use_attention_logits is False
    assert cfg.selected_visual_layers == (23, 17, 11, 5) and cfg.reduce_layer == 3
    assert cfg.attn_fuse_global is True and cfg.le_norm_type == "rmsnorm" and cfg.rms_norm_eps == 1e-5


def test_settings_override_config_json(tmp_path, qbase):
    d = write(tmp_path, qwen_ckpt_config(max_remain_ratio=0.5, reduce_threshold=0.4))
    s = GlimpseSettings(threshold=0.3, max_ratio=0.111, min_keep=3, layer=3)
    cfg = read_glimpse_config(d, qbase, s)
    got = (cfg.reduce_threshold, cfg.max_remain_ratio, cfg.min_remain_num, cfg.reduce_layer)
    assert got == (0.3, 0.111, 3, 3)
    assert cfg.selected_layers == (2,)  # K moves, the VIP's input layer stays
    cfg = read_glimpse_config(d, qbase, GlimpseSettings(fixed_ratio=0.25))
    assert cfg.fixed_remain_ratio == 0.25 and cfg.keep_rule.fixed_remain_ratio == 0.25
    cfg = read_glimpse_config(d, qbase, GlimpseSettings())
    assert (cfg.reduce_threshold, cfg.max_remain_ratio, cfg.reduce_layer) == (0.4, 0.5, 2)
    # a checkpoint in fixed mode switched back to the threshold mode by a threshold-mode knob
    d2 = write(tmp_path, qwen_ckpt_config(fixed_remain_ratio=0.2), name="fixed")
    assert read_glimpse_config(d2, qbase).fixed_remain_ratio == 0.2
    assert read_glimpse_config(d2, qbase, GlimpseSettings(max_ratio=0.3)).fixed_remain_ratio is None


def test_settings_errors(tmp_path, qbase):
    d = write(tmp_path)
    with pytest.raises(PruningSettingsError, match="fixed_ratio .* cannot be combined with max_ratio"):
        read_glimpse_config(d, qbase, GlimpseSettings(fixed_ratio=0.2, max_ratio=0.3))
    with pytest.raises(PruningSettingsError, match=r"K = 1 comes before layer 2.*K must be >= 2"):
        read_glimpse_config(d, qbase, GlimpseSettings(layer=1))
    with pytest.raises(PruningSettingsError,
                       match=r"K = 4 \(reduce_layer\) is not a layer of this 4-layer model"):
        read_glimpse_config(d, qbase, GlimpseSettings(layer=4))


def test_older_config_without_later_fields_uses_authors_defaults(qbase):
    cfg = qwen_ckpt_config()
    for k in ("anchor_positions",):
        cfg.pop(k)
    # fixed_remain_ratio / attn_fuse_use_flash_attn appeared after the first release
    out = parse_glimpse_config(cfg, qbase)
    assert out.fixed_remain_ratio is None and out.attn_fuse_use_flash_attn is False
    assert out.anchor_positions == ()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path, qbase):
    p = tmp_path / "nope"
    with pytest.raises(PruningSettingsError) as e:
        load_glimpse_checkpoint(str(p), qbase)
    msg = str(e.value)
    assert str(p) in msg and "does not exist" in msg and "config.json and new_modules_gp.pt" in msg


def test_path_is_a_file(tmp_path, qbase):
    f = tmp_path / "file.pt"
    f.write_bytes(b"x")
    with pytest.raises(PruningSettingsError, match="is a file; a checkpoint is a directory"):
        load_glimpse_checkpoint(f, qbase)


@pytest.mark.parametrize("which", ["weights", "config"])
def test_missing_file(tmp_path, qbase, which):
    d = write(tmp_path, config=False if which == "config" else None,
              state=False if which == "weights" else None)
    name = "new_modules_gp.pt" if which == "weights" else "config.json"
    with pytest.raises(PruningSettingsError) as e:
        load_glimpse_checkpoint(d, qbase)
    assert f"{name} not found in {d}" in str(e.value)


def test_unexpected_key(tmp_path, qbase):
    state = authors_state()
    state["attn_fuser"]["attn_out_projs.0.weight"] = torch.zeros(1, FUSE)  # deep-supervision head
    state["extra_module"] = {"weight": torch.zeros(3)}
    with pytest.raises(PruningSettingsError) as e:
        load_glimpse_checkpoint(write(tmp_path, state=state), qbase)
    msg = str(e.value)
    assert "unexpected keys: attn_fuser.attn_out_projs.0.weight, extra_module.weight" in msg
    assert "missing" not in msg


def test_missing_key(tmp_path, qbase):
    state = authors_state()
    del state["attn_fuser"]["layers.1.mlp.up_proj.bias"]
    del state["le_norm"]
    with pytest.raises(PruningSettingsError) as e:
        load_glimpse_checkpoint(write(tmp_path, state=state), qbase)
    assert "missing keys: attn_fuser.layers.1.mlp.up_proj.bias, le_norm.weight" in str(e.value)


def test_wrong_shape(tmp_path, qbase):
    state = authors_state()
    state["attn_fuser"]["cond_in_projs.1.weight"] = torch.zeros(COND, 1280)
    with pytest.raises(PruningSettingsError) as e:
        load_glimpse_checkpoint(write(tmp_path, state=state), qbase)
    assert "wrong shapes: attn_fuser.cond_in_projs.1.weight [64, 1280] (expected [64, 128])" in str(e.value)


def test_many_bad_keys_are_abbreviated(tmp_path, qbase):
    state = authors_state()
    state["attn_fuser"] = OrderedDict((f"x.{i}", torch.zeros(1)) for i in range(9))
    with pytest.raises(PruningSettingsError,
                       match=r"unexpected keys: attn_fuser\.x\.0, attn_fuser\.x\.1, attn_fuser\.x\.2, "
                       r"attn_fuser\.x\.3, attn_fuser\.x\.4, \.\.\. \(9 in all\)"):
        load_glimpse_checkpoint(write(tmp_path, state=state), qbase)


@pytest.mark.parametrize(
    "base_kw, text",
    [
        (dict(hidden=512), "hidden_size 256 in the checkpoint vs 512 in this model"),
        (dict(heads=8), "num_attention_heads 4 in the checkpoint vs 8 in this model"),
        (dict(layers=6), "num_hidden_layers 4 in the checkpoint vs 6 in this model"),
        (dict(vision=96), "vision hidden size 128 in the checkpoint vs 96 in this model"),
    ],
)
def test_wrong_base_model(tmp_path, base_kw, text):
    d = write(tmp_path)
    with pytest.raises(PruningSettingsError) as e:
        load_glimpse_checkpoint(d, qwen_base(**base_kw))
    assert "was made for another base model" in str(e.value) and text in str(e.value)


def test_wrong_model_family(tmp_path):
    with pytest.raises(PruningSettingsError,
                       match="made for a qwen2_5_vl base model .* model_type is 'llava'"):
        load_glimpse_checkpoint(write(tmp_path), llava_base())


def test_not_a_glimpse_checkpoint(tmp_path, qbase):
    d = write(tmp_path, {"model_type": "qwen2_5_vl", "hidden_size": HIDDEN})
    with pytest.raises(PruningSettingsError,
                       match="model_type 'qwen2_5_vl'; a GlimpsePrune checkpoint has model_type "
                             "'qwen2_5_vl_gp' or 'llava_llama_gp'"):
        load_glimpse_checkpoint(d, qbase)


@pytest.mark.parametrize(
    "over, text",
    [
        (dict(attn_fuse_type="AttnFuserV2"), "attn_fuse_type 'AttnFuserV2' is not supported"),
        (dict(selected_visual_layers=[3, 4]), r"selected_visual_layers \[3, 4\] name layers \[4\] outside"),
        (dict(use_zero_masks=True), "use_zero_masks: true"),
        (dict(selected_layers="2"), "field 'selected_layers' must be a list of integers"),
        (dict(max_remain_ratio=1.5), r"max_remain_ratio must be in \(0, 1\]"),
        (dict(le_layers=[1, 2]), "must contain layer 0"),
    ],
)
def test_bad_config_fields(tmp_path, qbase, over, text):
    with pytest.raises(PruningSettingsError, match=text):
        parse_glimpse_config(qwen_ckpt_config(**over), qbase)


def test_corrupt_weights_file(tmp_path, qbase):
    d = write(tmp_path, state=False)
    (d / "new_modules_gp.pt").write_bytes(b"not a torch file")
    with pytest.raises(PruningSettingsError, match="cannot read .*new_modules_gp.pt"):
        load_glimpse_checkpoint(d, qbase)


# --------------------------------------------------------------------------------------------
# Hugging Face hub ids (no network here: offline only)
# --------------------------------------------------------------------------------------------


def test_offline_hub_id_not_cached(tmp_path, qbase, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "ashun989/GlimpsePrune_Qwen2.5-VL-7B-Instruct"
    with pytest.raises(PruningSettingsError) as e:
        load_glimpse_checkpoint(repo, qbase, cache_dir=tmp_path / "hub")
    msg = str(e.value)
    assert repr(repo) in msg and "not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg and str(tmp_path / "hub") in msg


def test_offline_hub_id_from_cache(tmp_path, qbase, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "models--someone--tiny-gp"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots"
    snap.mkdir()
    write(snap, name=commit)
    ck = load_glimpse_checkpoint("someone/tiny-gp", qbase, cache_dir=cache)
    assert ck.directory == snap / commit and ck.config.reduce_layer == 2
