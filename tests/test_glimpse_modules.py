"""GlimpsePrune modules: parameter names/shapes of the real configurations (meta device) and the
VIP / glimpse-token maths against an independent re-derivation written here from the authors'
code (HVision-NKU/GlimpsePrune transformers_gp/models/qwen2_5_vl/model_gp.py AttnFuserV1,
AttnFuserLayer, CondSdpaAttention, CondFA2Attention, _try_add_le)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_glimpse.glimpse import (
    LLAVA,
    QWEN,
    GlimpseConfig,
    GlimpsePredictor,
    expected_shapes,
    glimpse_attention_scores,
    grid_positions,
)

# --------------------------------------------------------------------------------------------
# Real configurations: base sizes from the base models' config.json, GP settings from the
# authors' train_configs/*.yaml.
# --------------------------------------------------------------------------------------------

REAL = {
    "qwen2.5-vl-7b": dict(family=QWEN, hidden_size=3584, num_attention_heads=28, num_hidden_layers=28,
                          vision_hidden_size=1280, rms_norm_eps=1e-6, selected_layers=(18,), reduce_layer=18,
                          selected_visual_layers=(31, 23, 15, 7), use_attention_logits=True),
    "qwen2.5-vl-3b": dict(family=QWEN, hidden_size=2048, num_attention_heads=16, num_hidden_layers=36,
                          vision_hidden_size=1280, rms_norm_eps=1e-6, selected_layers=(23,), reduce_layer=23,
                          selected_visual_layers=(31, 23, 15, 7), use_attention_logits=True),
    "llava-1.5-7b": dict(family=LLAVA, hidden_size=4096, num_attention_heads=32, num_hidden_layers=32,
                         vision_hidden_size=1024, rms_norm_eps=1e-5, selected_layers=(21,), reduce_layer=21,
                         selected_visual_layers=(23, 17, 11, 5), use_attention_logits=False),
    "llava-1.5-13b": dict(family=LLAVA, hidden_size=5120, num_attention_heads=40, num_hidden_layers=40,
                          vision_hidden_size=1024, rms_norm_eps=1e-5, selected_layers=(26,), reduce_layer=26,
                          selected_visual_layers=(23, 17, 11, 5), use_attention_logits=False),
}


def real_config(name: str, **over) -> GlimpseConfig:
    kw = dict(REAL[name])
    kw.setdefault("le_layers", tuple(range(kw["num_hidden_layers"])))
    kw.update(over)
    return GlimpseConfig(**kw)


def authors_table(hidden, heads, layers, vision, n_blocks=4, fuse=256, cond=512, deep=False):
    """Key -> shape of new_modules_gp.pt, written out from the authors' module definitions."""
    t = {"learnable_embeddings": (layers, 1, hidden), "le_proj.weight": (hidden, hidden),
         "le_proj.bias": (hidden,), "le_norm.weight": (hidden,),
         "attn_fuser.attn_in_proj.weight": (fuse, heads), "attn_fuser.attn_in_proj.bias": (fuse,)}
    for i in range(n_blocks):
        a = f"attn_fuser.layers.{i}."
        t[f"attn_fuser.cond_in_projs.{i}.weight"] = (cond, vision)
        t[f"attn_fuser.cond_in_projs.{i}.bias"] = (cond,)
        t[a + "norm1.weight"] = (fuse,)
        t[a + "norm2.weight"] = (fuse,)
        for p in "qk":
            t[a + f"attn.{p}_proj.weight"] = (fuse + cond, fuse + cond)
        for p in "vo":
            t[a + f"attn.{p}_proj.weight"] = (fuse, fuse)
        for p in ("gate", "up"):
            t[a + f"mlp.{p}_proj.weight"] = (2 * fuse, fuse)
            t[a + f"mlp.{p}_proj.bias"] = (2 * fuse,)
        t[a + "mlp.down_proj.weight"] = (fuse, 2 * fuse)
        t[a + "mlp.down_proj.bias"] = (fuse,)
        if deep or i == n_blocks - 1:
            t[f"attn_fuser.attn_out_projs.{i}.weight"] = (1, fuse)
            t[f"attn_fuser.attn_out_projs.{i}.bias"] = (1,)
    return t


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_configuration_names_and_shapes(name):
    cfg = real_config(name)
    r = REAL[name]
    want = authors_table(r["hidden_size"], r["num_attention_heads"], r["num_hidden_layers"],
                         r["vision_hidden_size"])
    with torch.device("meta"):
        module = GlimpsePredictor(cfg)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == want
    assert all(v.device.type == "meta" for v in module.state_dict().values())
    assert expected_shapes(cfg) == want


def test_qwen7b_table_of_design_md():
    s = expected_shapes(real_config("qwen2.5-vl-7b"))
    assert s["attn_fuser.attn_in_proj.weight"] == (256, 28)
    for i in range(4):
        assert s[f"attn_fuser.cond_in_projs.{i}.weight"] == (512, 1280)
        assert s[f"attn_fuser.layers.{i}.attn.q_proj.weight"] == (768, 768)
        assert s[f"attn_fuser.layers.{i}.attn.k_proj.weight"] == (768, 768)
        assert s[f"attn_fuser.layers.{i}.attn.v_proj.weight"] == (256, 256)
        assert s[f"attn_fuser.layers.{i}.attn.o_proj.weight"] == (256, 256)
        assert s[f"attn_fuser.layers.{i}.mlp.gate_proj.bias"] == (512,)
        assert s[f"attn_fuser.layers.{i}.mlp.down_proj.weight"] == (256, 512)
    assert s["attn_fuser.attn_out_projs.3.weight"] == (1, 256)
    assert not any(k.startswith(f"attn_fuser.attn_out_projs.{i}.") for i in range(3) for k in s)
    assert s["learnable_embeddings"] == (28, 1, 3584)
    assert s["le_proj.weight"] == (3584, 3584) and s["le_norm.weight"] == (3584,)
    # "~22M" is everything in new_modules_gp.pt: VIP 9.45M + glimpse token 12.95M (le_proj 12.85M)
    total = sum(math.prod(v) for v in s.values())
    vip = sum(math.prod(v) for k, v in s.items() if k.startswith("attn_fuser."))
    assert total == 22_406_657 and vip == 9_454_081


def test_head_split_and_rotary_sizes_of_released_configs():
    cfg = real_config("qwen2.5-vl-7b")
    assert (cfg.qk_head_dim, cfg.v_head_dim, cfg.rotary_dim) == (192, 64, 96)
    with torch.device("meta"):
        m = GlimpsePredictor(cfg)
    assert m.attn_fuser.rotary.inv_freq.numel() == 48  # per axis; rows + cols = 96, doubled = 192
    assert m.attn_fuser.layers[0].norm1.variance_epsilon == 1e-6


def test_deep_supervision_keeps_every_output_projection_and_no_token_variant():
    s = expected_shapes(real_config("qwen2.5-vl-7b", deep_supervision=True))
    assert all(f"attn_fuser.attn_out_projs.{i}.weight" in s for i in range(4))
    s = expected_shapes(real_config("qwen2.5-vl-7b", le_layers=()))
    assert not any(k.startswith(("le_", "learnable")) for k in s)
    s = expected_shapes(real_config("qwen2.5-vl-7b", le_norm_type="layernorm"))
    assert s["le_norm.bias"] == (3584,)


# --------------------------------------------------------------------------------------------
# VIP maths vs an independent reference
# --------------------------------------------------------------------------------------------


def tiny_config(**over) -> GlimpseConfig:
    kw = dict(family=QWEN, hidden_size=64, num_attention_heads=4, num_hidden_layers=4, vision_hidden_size=24,
              rms_norm_eps=1e-6, selected_layers=(1, 2), reduce_layer=2, selected_visual_layers=(3, 1),
              le_layers=(0, 1, 2, 3), le_length=1, use_attention_logits=True, attn_fuse_size=32,
              visual_cond_size=32, attn_fuse_num_heads=4)
    kw.update(over)
    return GlimpseConfig(**kw)


def random_predictor(cfg, seed=0) -> GlimpsePredictor:
    torch.manual_seed(seed)
    m = GlimpsePredictor(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


def ref_rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_vip(m: GlimpsePredictor, attn, feats, grid, groups, fa2=False):
    """Straight from the authors' definitions; dense attention with a block mask."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    cfg = m.config
    F_, C, H = cfg.attn_fuse_size, cfg.visual_cond_size, cfg.attn_fuse_num_heads
    D = (F_ + C) // H
    rows, cols = [], []
    for h, w in grid:
        for r in range(h):
            for c in range(w):
                rows.append(r)
                cols.append(c)
    rows, cols = torch.tensor(rows, dtype=torch.float64), torch.tensor(cols, dtype=torch.float64)
    dim = D // 2
    freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = torch.cat([rows[:, None] * freq, cols[:, None] * freq], dim=1)  # [N, D/2]

    def rope(x):  # x [N, H, D]; pairs (i, i + D/2) rotated by ang[i]
        a = ang[:, None, :]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()], -1)

    n = attn.shape[0]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for g in groups:
        g = torch.as_tensor(g)
        allowed[g[:, None], g[None, :]] = True
    lin = lambda x, p, bias=True: x @ sd[p + ".weight"].T + (sd[p + ".bias"] if bias else 0)
    h = lin(attn.double(), "attn_fuser.attn_in_proj")
    for i in range(cfg.num_vip_blocks):
        a = f"attn_fuser.layers.{i}."
        cond = lin(feats[i].double(), f"attn_fuser.cond_in_projs.{i}")
        x = ref_rms(h, sd[a + "norm1.weight"], 1e-6)
        qk_in = torch.cat([x, cond], -1)
        q = rope(lin(qk_in, a + "attn.q_proj", False).view(n, H, D))
        k = rope(lin(qk_in, a + "attn.k_proj", False).view(n, H, D))
        v = lin(x, a + "attn.v_proj", False)
        if fa2:
            v = torch.cat([v, torch.ones(n, C, dtype=v.dtype)], -1)
        v = v.view(n, H, -1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        s = s.masked_fill(~allowed, float("-inf"))
        o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, -1)[:, :F_]
        h = h + lin(o, a + "attn.o_proj", False)
        y = ref_rms(h, sd[a + "norm2.weight"], 1e-6)
        g_ = lin(y, a + "mlp.gate_proj")
        h = h + lin(torch.nn.functional.silu(g_) * lin(y, a + "mlp.up_proj"), a + "mlp.down_proj")
    last = cfg.num_vip_blocks - 1
    return lin(h, f"attn_fuser.attn_out_projs.{last}").squeeze(-1)


def inputs(cfg, grid, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grid)
    attn = torch.randn(n, cfg.vip_input_size, generator=g)
    feats = [torch.randn(n, cfg.vision_hidden_size, generator=g) for _ in cfg.selected_visual_layers]
    return attn, feats


def image_groups(grid):
    out, st = [], 0
    for h, w in grid:
        out.append(list(range(st, st + h * w)))
        st += h * w
    return out


@pytest.mark.parametrize("family", [QWEN, LLAVA])
def test_vip_matches_reference_whole_image_attention(family):
    cfg = tiny_config(family=family)
    m = random_predictor(cfg)
    grid = [(3, 4), (5, 2), (1, 1)]
    attn, feats = inputs(cfg, grid)
    with torch.no_grad():
        out = m(attn, feats, grid)
    ref = ref_vip(m, attn, feats, grid, image_groups(grid))
    assert out.shape == (sum(h * w for h, w in grid),)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # images do not see each other: changing image 1 leaves image 0's logits alone
    feats2 = [f.clone() for f in feats]
    feats2[0][12:22] += 5.0
    with torch.no_grad():
        out2 = m(attn, feats2, grid)
    torch.testing.assert_close(out2[:12], out[:12])
    assert not torch.allclose(out2[12:22], out[12:22])


def test_vip_ignores_window_order_in_global_mode_and_grid_may_be_a_tensor():
    cfg = tiny_config()
    m = random_predictor(cfg)
    grid = [(4, 4)]
    attn, feats = inputs(cfg, grid)
    with torch.no_grad():
        a = m(attn, feats, grid)
        b = m(attn, feats, torch.tensor(grid), window_index=torch.randperm(16), window_seqlens=[4] * 4)
    torch.testing.assert_close(a, b)


def test_vip_windowed_mode_attends_inside_windows_only():
    cfg = tiny_config(attn_fuse_global=False)
    m = random_predictor(cfg)
    grid = [(4, 4)]
    attn, feats = inputs(cfg, grid)
    # 2x2 windows of the 4x4 grid, in window order (as the ViT's get_window_index)
    windows = [[r * 4 + c for r in range(R, R + 2) for c in range(C, C + 2)] for R in (0, 2) for C in (0, 2)]
    window_index = torch.tensor([i for w in windows for i in w])
    with pytest.raises(ValueError, match="window_index and window_seqlens"):
        m(attn, feats, grid)
    with torch.no_grad():
        out = m(attn, feats, grid, window_index=window_index, window_seqlens=[4, 4, 4, 4])
    ref = ref_vip(m, attn, feats, grid, windows)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    glob = ref_vip(m, attn, feats, grid, image_groups(grid))
    assert not torch.allclose(out.double(), glob, atol=1e-3)


def test_vip_fa2_value_layout_matches_reference_and_differs_from_sdpa():
    cfg = tiny_config(attn_fuse_use_flash_attn=True)
    m = random_predictor(cfg)
    grid = [(3, 3)]
    attn, feats = inputs(cfg, grid)
    with torch.no_grad():
        out = m(attn, feats, grid)
    torch.testing.assert_close(out.double(), ref_vip(m, attn, feats, grid, image_groups(grid), fa2=True),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.double(), ref_vip(m, attn, feats, grid, image_groups(grid)), atol=1e-3)


def test_vip_input_checks():
    cfg = tiny_config()
    m = random_predictor(cfg)
    attn, feats = inputs(cfg, [(2, 2)])
    with pytest.raises(ValueError, match=r"must be \[4, 8\]"):
        m(attn[:, :4], feats, [(2, 2)])
    with pytest.raises(ValueError, match="needs 2 vision feature maps"):
        m(attn, feats[:1], [(2, 2)])
    with pytest.raises(ValueError, match="vision features of layer 1"):
        m(attn, [feats[0], feats[1][:, :5]], [(2, 2)])


def test_bf16_moves_rotary_table_to_bf16_like_the_authors():
    cfg = tiny_config()
    m = random_predictor(cfg).to(torch.bfloat16)
    assert m.attn_fuser.rotary.inv_freq.dtype == torch.bfloat16
    attn, feats = inputs(cfg, [(3, 5)])
    with torch.no_grad():
        out = m(attn, feats, [(3, 5)])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_grid_positions_row_major():
    pos = grid_positions([(2, 3), (1, 2)])
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [0, 0], [0, 1]]


# --------------------------------------------------------------------------------------------
# Glimpse token and glimpse attention
# --------------------------------------------------------------------------------------------


def test_glimpse_embedding_is_norm_of_projection_per_layer():
    cfg = tiny_config(le_layers=(0, 2, 3), rms_norm_eps=1e-5)
    m = random_predictor(cfg)
    sd = {k: v.double() for k, v in m.state_dict().items()}
    with torch.no_grad():
        e2 = m.glimpse_embedding(2)
        allv = m.glimpse_embeddings()
    ref = ref_rms(sd["learnable_embeddings"][1] @ sd["le_proj.weight"].T + sd["le_proj.bias"],
                  sd["le_norm.weight"], 1e-5)
    torch.testing.assert_close(e2.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(allv[1], e2)
    assert e2.shape == (1, 64)
    assert m.glimpse_embedding(1) is None  # layer 1 not in le_layers
    assert GlimpsePredictor(tiny_config(le_layers=())).glimpse_embedding(0) is None


def test_glimpse_attention_scores_gqa_and_log_softmax():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 8, generator=g)
    keys = torch.randn(10, 2, 8, generator=g)  # 2 KV heads serve 4 query heads
    img = torch.tensor([2, 3, 4, 7])
    raw = glimpse_attention_scores(q, keys, img, use_attention_logits=True)
    assert raw.shape == (4, 4)
    for h in range(4):
        kv = h // 2  # repeat_kv: query head h uses KV head h // n_rep
        want = keys[img, kv] @ q[h] / math.sqrt(8)
        torch.testing.assert_close(raw[:, h], want)
    ls = glimpse_attention_scores(q, keys, img, use_attention_logits=False)
    full = torch.stack([(keys[:, h // 2] @ q[h] / math.sqrt(8)).log_softmax(0) for h in range(4)], 1)
    torch.testing.assert_close(ls, full[img])  # normalised over all 10 keys, not the 4 image ones


@pytest.mark.parametrize("family", [QWEN, LLAVA])
def test_vip_padded_one_call_over_images_matches_reference(family):
    """The GPU layout of the VIP's attention (all images of a batch padded into one masked call)
    gives the reference's logits, as the per-image loop does; images of different sizes, one of a
    single token."""
    cfg = tiny_config(family=family)
    m = random_predictor(cfg)
    grid = [(3, 4), (5, 2), (1, 1), (2, 2)]
    attn, feats = inputs(cfg, grid, seed=3)
    ref = ref_vip(m, attn, feats, grid, image_groups(grid))
    for padded in (True, False):
        for block in m.attn_fuser.layers:
            block.attn.padded_groups = padded
        with torch.no_grad():
            out = m(attn, feats, grid)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4, msg=f"padded={padded}")


def test_vip_in_row_chunks_is_exact(monkeypatch):
    """The VIP's row-wise work (q / k projections, float32 RoPE, MLP) done a chunk of rows at a
    time on the CPU, to bound its temporaries, gives the same bits as in one piece."""
    from vllm_glimpse.glimpse import modules

    cfg = tiny_config()
    m = random_predictor(cfg)
    grid = [(5, 7), (3, 3)]
    attn, feats = inputs(cfg, grid, seed=4)
    with torch.no_grad():
        whole = m(attn, feats, grid)
        assert len(modules._row_chunks(44, on_cuda=False)) == 1  # 5 x 7 + 3 x 3 rows: one chunk
        monkeypatch.setattr(modules, "VIP_CHUNK_ROWS", 8)
        chunked = m(attn, feats, grid)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vip_rope_half_by_half_equals_textbook_form(dtype):
    """The VIP's RoPE written half by half gives the bits of x * cos + rotate_half(x) * sin in
    float32, cast back (transformers' apply_rotary_pos_emb_vision)."""
    from vllm_glimpse.glimpse import modules

    rotary = modules.GridRotaryEmbedding(48).to(dtype)
    cos, sin = rotary.cos_sin(grid_positions([(7, 9), (4, 4)]))
    x = (torch.randn(79, 4, 96, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    xf, c, s = x.float(), cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    want = (xf * c + modules._rotate_half(xf) * s).to(dtype)
    assert torch.equal(modules._apply_rope(x, cos, sin), want)
