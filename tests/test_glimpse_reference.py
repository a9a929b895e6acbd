"""The independent GlimpsePrune reference (tests/reference/glimpse_hf.py) on the tiny models.

A synthetic checkpoint in the authors' layout (``config.json`` + ``new_modules_gp.pt``, as
``tests/test_glimpse_checkpoint.py`` writes them) sized for the tiny models, loaded with
:func:`load_glimpse_checkpoint`. No vLLM engine is started.

* the glimpse token leaves every other token's hidden states at layers 0..K unchanged, and its
  scores are the HF layer's own attention (checked through the eager attention probabilities);
* keep-all (``fixed_remain_ratio`` 1.0) gives the unpruned HF model's ``generate`` tokens and
  its prefill logits;
* a real pruning setting keeps the expected count, feeds survivors at their original
  positions, decodes at last position + 1, and changes the tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from tests.reference.glimpse_hf import (
    glimpse_generate,
    prepare_llava,
    prepare_qwen,
    qwen_pool_to_raster,
)
from vllm_glimpse.glimpse import KeepRule, load_glimpse_checkpoint
from vllm_glimpse.testing.glimpse_checkpoints import write_tiny_checkpoint
from vllm_glimpse.testing.workloads import chat_prompt, mixed_batch

MAX_NEW = 8
KEEP_ALL = KeepRule(fixed_remain_ratio=1.0)
PRUNE = KeepRule(fixed_remain_ratio=0.25)

# mixed_batch(): 0 one image 448x448, 3 text-only, 4 two images


def _predictor(directory, model, family):
    write_tiny_checkpoint(directory, family, model.config)
    return load_glimpse_checkpoint(directory, model.config, dtype=torch.float32).predictor


@pytest.fixture(scope="module")
def qwen(tiny_models, tmp_path_factory):
    path = tiny_models["qwen2_5_vl"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    predictor = _predictor(tmp_path_factory.mktemp("gp") / "qwen", model, "qwen2_5_vl")
    return "qwen2_5_vl", model, processor, predictor


@pytest.fixture(scope="module")
def llava(tiny_models, tmp_path_factory):
    path = tiny_models["llava"]
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    predictor = _predictor(tmp_path_factory.mktemp("gp") / "llava", model, "llava")
    return "llava", model, processor, predictor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: torch's intra-op threads fight other processes (one thread is several
    times faster here). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["qwen", "llava"])
def family(request):
    return request.getfixturevalue(request.param)


# Runs shared by the tests of this module, keyed by (family name, mixed_batch index).
_prepared: dict = {}
_runs: dict = {}


def _prepare(family, index):
    name, model, processor, predictor = family
    key = (name, index)
    if key not in _prepared:
        spec = mixed_batch()[index]
        prompt = chat_prompt(processor.tokenizer, spec.text, len(spec.images))
        images = [img.build() for img in spec.images]
        prep = prepare_qwen if name == "qwen2_5_vl" else prepare_llava
        _prepared[key] = (prompt, images,
                          prep(model, processor, prompt, images, predictor.config.selected_visual_layers))
    return _prepared[key]


def _keep_all(family, index):
    """Keep-all run (layers 0..K recorded) and the HF eager attention probabilities of layer K at
    its prefill (captured by a hook on the HF attention module the reference calls)."""
    name, model, processor, predictor = family
    key = (name, index, "keep_all")
    if key not in _runs:
        _, _, prep = _prepare(family, index)
        captured = []
        attn = model.model.language_model.layers[predictor.config.reduce_layer].self_attn
        hook = attn.register_forward_hook(
            lambda mod, args, out: captured.append(out[1]) if not captured else None)
        try:
            res = glimpse_generate(model, prep, predictor, MAX_NEW, keep_rule=KEEP_ALL, record_layers=True)
        finally:
            hook.remove()
        _runs[key] = (res, captured[0])
    return _runs[key]


@torch.no_grad()
def _hf_generate(model, processor, prompt, images):
    """The unpruned HF model's own greedy generate: tokens and the first step's logits."""
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1,
                         repetition_penalty=1.0, return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, inputs.input_ids.shape[1]:].tolist(), out.logits[0][0]


# --------------------------------------------------------------------------------------------
# (a) the glimpse token is invisible to the other tokens in layers 0..K
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 4])
def test_glimpse_token_leaves_other_tokens_unchanged(family, index):
    name, model, processor, predictor = family
    K = predictor.config.reduce_layer
    _, _, prep = _prepare(family, index)
    P = prep.input_ids.numel()
    plain = glimpse_generate(model, prep, predictor, 1, use_glimpse=False, record_layers=True)
    glimpse, _ = _keep_all(family, index)
    assert len(glimpse.layer_outputs) == K + 1
    assert len(plain.layer_outputs) == len(model.model.language_model.layers)
    for layer in range(K + 1):
        with_g, without = glimpse.layer_outputs[layer], plain.layer_outputs[layer]
        assert with_g.shape[0] == P + 1 and without.shape[0] == P
        torch.testing.assert_close(with_g[:P], without, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(with_g[P], without[-1])  # the glimpse row is a token of its own
    # its position: last position + 1 on every axis
    assert torch.equal(glimpse.glimpse_position, prep.positions[:, -1] + 1)


def test_glimpse_embedding_is_the_layer0_input_and_added_later(family):
    """Layer 0 input of the glimpse row is glimpse_embedding(0); before layer 1 the layer-1
    embedding is added: replaying layers 0 and 1 by hand with those inputs reproduces the rows."""
    name, model, processor, predictor = family
    from tests.reference.glimpse_hf import SimpleKV, _TextModel

    _, _, prep = _prepare(family, 0)
    P = prep.input_ids.numel()
    res, _ = _keep_all(family, 0)
    tm = _TextModel(model, name)
    pos = torch.cat([prep.positions, prep.positions[:, -1:] + 1], dim=1)
    with torch.no_grad():
        h0 = torch.cat([prep.inputs_embeds, predictor.glimpse_embedding(0)])
        cs = tm.rope(h0, pos)
        kv = SimpleKV()
        out0 = tm.run_layer(0, h0, cs, kv)
        torch.testing.assert_close(out0, res.layer_outputs[0], rtol=1e-5, atol=1e-5)
        h1 = out0.clone()
        h1[P] += predictor.glimpse_embedding(1)[0]
        out1 = tm.run_layer(1, h1, cs, kv)
        torch.testing.assert_close(out1, res.layer_outputs[1], rtol=1e-5, atol=1e-5)
        # without the addition the glimpse row would differ
        assert not torch.allclose(out1[P], tm.run_layer(1, out0, cs, SimpleKV())[P], atol=1e-3)


@torch.no_grad()
def test_qwen_vision_conditions_are_in_raster_order(qwen):
    """The pooling + reordering applied to ViT block outputs, applied to the input of block 0
    (window order), gives the patch embeddings mean-pooled in the processor's (raster) order."""
    _, model, processor, _ = qwen
    visual = model.model.visual
    spec = mixed_batch()[4]  # two images
    inputs = processor(text=[chat_prompt(processor.tokenizer, spec.text, 2)],
                       images=[img.build() for img in spec.images], return_tensors="pt")
    seen = {}
    hooks = [visual.patch_embed.register_forward_hook(lambda m, a, out: seen.__setitem__("embed", out)),
             visual.blocks[0].register_forward_pre_hook(
                 lambda m, a, kw: seen.__setitem__("block0_in", a[0] if a else kw["hidden_states"]),
                 with_kwargs=True)]
    try:
        visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw)
    finally:
        for h in hooks:
            h.remove()
    unit = visual.spatial_merge_unit
    raster = seen["embed"].reshape(-1, unit, seen["embed"].shape[-1]).mean(1)
    assert not torch.equal(seen["block0_in"], seen["embed"])  # the window order is a real permutation
    torch.testing.assert_close(qwen_pool_to_raster(visual, seen["block0_in"], inputs.image_grid_thw), raster)


def test_glimpse_scores_match_hf_attention_probabilities(family):
    """The scores computed from the layer's projections agree with HF's eager attention of layer
    K for the glimpse row: log p = raw - logsumexp (Qwen, raw logits) / log p = score (LLaVA)."""
    name, model, processor, predictor = family
    _, _, prep = _prepare(family, 4)
    res, probs = _keep_all(family, 4)
    probs = probs[0, :, -1]  # [heads, P + 1]: the glimpse row of the prefill
    assert probs.shape[-1] == prep.input_ids.numel() + 1
    log_p = probs[:, prep.image_index].T.log()  # [N, heads]
    scores = res.attn_scores
    assert scores.shape == (prep.image_index.numel(), model.config.text_config.num_attention_heads)
    if predictor.config.use_attention_logits:
        diff = log_p - scores  # = -logsumexp per head, the same for every image column
        torch.testing.assert_close(diff, diff[:1].expand_as(diff), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(log_p, scores, atol=1e-2)  # raw logits, not log-probabilities
    else:
        torch.testing.assert_close(scores, log_p, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# (b) keep-all == the unpruned HF model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 3, 4])  # one image, text-only, two images
def test_keep_all_matches_hf_generate(family, index):
    name, model, processor, predictor = family
    prompt, images, prep = _prepare(family, index)
    want, first_logits = _hf_generate(model, processor, prompt, images)
    if images:
        got, _ = _keep_all(family, index)
        assert bool(got.keep.all()) and got.keep.numel() == prep.image_index.numel()
        assert got.kept_per_image == [h * w for h, w in prep.grid_hw]
        assert torch.equal(got.survivor_positions, prep.positions)
    else:
        got = glimpse_generate(model, prep, predictor, MAX_NEW, keep_rule=KEEP_ALL)
        assert got.keep is None and got.attn_scores is None  # text-only: no glimpse, as the authors
    assert len(want) == MAX_NEW
    assert got.tokens == want, (name, index)
    torch.testing.assert_close(got.prefill_logits[-1], first_logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# (c) real pruning
# --------------------------------------------------------------------------------------------


def test_pruning_counts_positions_and_effect(family):
    name, model, processor, predictor = family
    changed = []
    for index in (0, 4):
        prompt, images, prep = _prepare(family, index)
        N, P = prep.image_index.numel(), prep.input_ids.numel()
        full, _ = _keep_all(family, index)
        res = glimpse_generate(model, prep, predictor, MAX_NEW, keep_rule=PRUNE)
        # the keep mask: top int(0.25 N) of the VIP logits over all of the request's image tokens
        assert res.keep.shape == (N,) and int(res.keep.sum()) == max(1, int(0.25 * N))
        assert sum(res.kept_per_image) == int(res.keep.sum()) and len(res.kept_per_image) == len(images)
        kept_logits, dropped_logits = res.image_logits[res.keep], res.image_logits[~res.keep]
        assert kept_logits.min() >= dropped_logits.max()
        torch.testing.assert_close(res.image_logits, full.image_logits)  # the VIP ignores the rule
        # survivors: every text token + the kept image tokens, at their ORIGINAL positions
        kept_rows = prep.image_index[res.keep]
        is_image = torch.isin(torch.arange(P), prep.image_index)
        expect_rows = torch.nonzero(~is_image | torch.isin(torch.arange(P), kept_rows)).squeeze(-1)
        assert torch.equal(res.survivor_index, expect_rows)
        assert res.survivor_positions.shape[1] == P - N + int(res.keep.sum())
        assert torch.equal(res.survivor_positions, prep.positions[:, expect_rows])
        assert not torch.equal(res.survivor_positions[0], torch.arange(expect_rows.numel()))  # not renumbered
        # decoding continues at the original last position + 1, on every axis
        last = prep.positions[:, -1]
        assert len(res.decode_positions) == MAX_NEW - 1 and len(res.tokens) == MAX_NEW
        for step, pos in enumerate(res.decode_positions):
            assert torch.equal(pos, last + 1 + step)
        changed.append(res.tokens != full.tokens)
    assert any(changed), f"{name}: pruning 75% of the image tokens changed no request's tokens"


def test_threshold_rule_of_the_checkpoint(family):
    """The checkpoint's own rule (threshold 0.5, min 1): kept = sigmoid(logit) > 0.5, at least one."""
    name, model, processor, predictor = family
    _, _, prep = _prepare(family, 0)
    res = glimpse_generate(model, prep, predictor, 1)
    expect = torch.sigmoid(res.image_logits) > 0.5
    if not expect.any():
        expect[res.image_logits.argmax()] = True
    assert torch.equal(res.keep, expect)
    assert 0 < int(res.keep.sum()) <= res.keep.numel()
