"""VisionZip on Qwen3-VL: vLLM + plugin against the independent HF reference on the same tiny
weights. One engine for the module (VisionZip, default ratios); other budgets go through
per-request ``mm_processor_kwargs``.

Kept slots, merged embeddings (main and every DeepStack tap) and position channels of our vLLM
ViT path; M-RoPE positions of the pruned prompt (kept tokens, text after each image, a video
left unpruned) against vLLM's unpruned layout; greedy tokens of the mixed batch; placeholder
counts fixed when the prompt is processed."""

import types

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from tests.reference import visionzip_qwen_family_hf as ref
from vllm_glimpse.settings import visionzip_counts
from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS, make_llm, shutdown
from vllm_glimpse.testing.tiny_models import tiny_model_path
from vllm_glimpse.testing.workloads import ImageSpec, build_request, mixed_batch

MAX_TOKENS = 10
DEFAULT = (0.65, 0.05)
RATIOS = [DEFAULT, (0.3, 0.1), (0.1, 0.02), (1.0, 0.0)]


@pytest.fixture(scope="module")
def path():
    return str(tiny_model_path("qwen3_vl"))


@pytest.fixture(scope="module")
def hf(path):
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(path):
    llm = make_llm(path, method="visionzip", limit_mm_per_prompt={"image": 2, "video": 1})
    yield llm
    shutdown(llm)


def _images():
    """448x448, 640x360 (wide), 280x504 (tall), 336x336, 224x392 and 56x56 (4 tokens)."""
    return [image.build() for spec in mixed_batch() for image in spec.images]


# ---- the reference itself -----------------------------------------------------------------


def test_reference_keeping_every_token_is_hf_generate(hf):
    """With every token kept, the reference's own prefill (embeddings, positions, DeepStack
    features placed by hand) decodes exactly as transformers' generate: it builds the LLM
    input the way the model does."""
    model, processor = hf
    spec = mixed_batch()[4]  # two images
    prompt = build_request(processor.tokenizer, spec)["prompt"]
    images = [i.build() for i in spec.images]
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    want = out[0, inputs.input_ids.shape[1]:].tolist()
    assert ref.generate(model, processor, prompt, images, 1.0, 0.0, MAX_TOKENS) == want


# ---- selection, merge, DeepStack, position channels: our vLLM ViT path ----------------------


@pytest.mark.parametrize("ratios", RATIOS)
def test_kept_slots_and_merged_embeddings_match_reference(engine, hf, ratios):
    """Per image, what our model hands the LLM (main embedding, each DeepStack embedding, each
    token's (t, h, w) channels) equals the reference's pruned image sequence: the same slots in
    raster order, each contextual token in its target's slot, the DeepStack rows selected and
    merged exactly as the main ones."""
    model, processor = hf
    visual = model.model.visual
    taps = len(visual.deepstack_visual_indexes)
    for image in _images():
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        grid = inputs.image_grid_thw
        features, select_mask, context_idx, context_tokens = ref.visionzip_image(
            visual, inputs.pixel_values, grid, *ratios)
        want = [ref.image_sequence(f, select_mask, context_idx, c)
                for f, c in zip(features, context_tokens)]
        want_slots = want[0][1]

        # vLLM normalises on the device (mm_device_do_normalize): its ViT takes the resized
        # image's raw bytes.
        raw = processor.image_processor(images=[image], return_tensors="pt", do_rescale=False,
                                        do_normalize=False).pixel_values.to(torch.uint8)

        def ours(vllm_model, pixel_values=raw, grid=grid):
            image_input = {"type": "pixel_values", "pixel_values": pixel_values,
                           "image_grid_thw": grid}
            return vllm_model._visionzip_images(image_input, [ratios])[0].cpu()

        got = engine.apply_model(ours)[0]
        n = int(grid.prod()) // 4
        assert got.shape[0] == sum(visionzip_counts(n, *ratios)) == len(want_slots)
        width = features[0].shape[1]
        assert got.shape[1] == width * (1 + taps) + 3
        for level, (tokens, _) in enumerate(want):
            torch.testing.assert_close(got[:, level * width:(level + 1) * width], tokens,
                                       rtol=1e-3, atol=1e-3)
        _, h, w = grid[0].tolist()
        rows, cols = want_slots // (w // 2), want_slots % (w // 2)
        expected_channels = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
        assert got[:, -3:].long().tolist() == expected_channels.tolist()


# ---- positions ------------------------------------------------------------------------------


def _features(items):
    """mm_features as the runner passes them: modality, placeholder range, grid."""
    from vllm.multimodal.inputs import PlaceholderRange

    return [types.SimpleNamespace(
        modality=modality, mm_position=PlaceholderRange(offset=offset, length=length),
        data={f"{modality}_grid_thw": types.SimpleNamespace(data=torch.tensor(grid))})
        for modality, grid, offset, length in items]


def _prompt(config, items, text_lengths):
    """Token ids: text, then per item (image: vision_start, kept image tokens, vision_end;
    video: per frame a timestamp, vision_start, the frame's tokens, vision_end), then text.
    Returns ids, features and, per item, the indices of its embedding tokens."""
    ids, features, embed_at = [7] * text_lengths[0], [], []
    for (modality, grid, count), text in zip(items, text_lengths[1:]):
        if modality == "image":
            ids.append(config.vision_start_token_id)
            features.append(("image", grid, len(ids), count))
            embed_at.append(list(range(len(ids), len(ids) + count)))
            ids += [config.image_token_id] * count + [config.vision_end_token_id]
        else:
            start, at = len(ids), []
            for _ in range(grid[0]):
                ids += [9, 9, config.vision_start_token_id]
                at += range(len(ids), len(ids) + count)
                ids += [config.video_token_id] * count + [config.vision_end_token_id]
            features.append(("video", grid, start, len(ids) - start))
            embed_at.append(at)
        ids += [7] * text
    return ids, _features(features), embed_at


@pytest.mark.parametrize("steps", ["one", "per_item", "mid_image"])
def test_positions_of_pruned_layout_equal_unpruned(path, steps):
    """Kept image tokens sit at their slots' (t, h, w) positions of the unpruned prompt (a
    contextual token at its target's), a video (not pruned) and the text after each item, and
    decoding, continue exactly as without pruning. Runs our get_mrope_input_positions, then our
    recompute_mrope_positions on embeddings carrying the position channels as the runner calls
    them: the whole prompt in one step, one item per step, or an image split across steps."""
    from transformers import AutoConfig
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration as Vanilla

    from vllm_glimpse.models.qwen3_vl import VisionZipQwen3VLForConditionalGeneration as Ours
    from vllm_glimpse.models.qwen_visionzip import media_positions

    config = AutoConfig.from_pretrained(path)
    grids = [("image", [1, 32, 32]), ("image", [1, 12, 22]), ("video", [3, 8, 12]),
             ("image", [1, 36, 20]), ("image", [1, 4, 4])]
    rng = np.random.default_rng(0)
    slots, channels = [], []
    for modality, (t, h, w) in grids:
        if modality == "video":  # each frame at (0, row, column) from its own run's start
            local = media_positions(1, h // 2, w // 2).repeat(t, 1)
            slots.append(np.arange(local.shape[0]))
        else:
            n = h * w // 4
            slots.append(np.sort(rng.permutation(n)[:sum(visionzip_counts(n, 0.45, 0.05))]))
            local = media_positions(1, h // 2, w // 2)[slots[-1]]
        channels.append(local)
    texts = [5, 3, 4, 2, 6, 3]

    def counts(pruned):
        return [(m, g, len(s) if (pruned and m == "image") else g[1] * g[2] // 4)
                for (m, g), s in zip(grids, slots)]

    full_ids, full_features, full_at = _prompt(config, counts(False), texts)
    full_pos, full_delta = Vanilla._get_mrope_input_positions(full_ids, full_features, config)
    ids, features, embed_at = _prompt(config, counts(True), texts)
    stub = types.SimpleNamespace(config=config, visionzip_ratios=(0.45, 0.05))
    stub._unpruned_mrope_input_positions = types.MethodType(
        Ours._unpruned_mrope_input_positions, stub)
    positions, _ = Ours.get_mrope_input_positions(stub, ids, features)
    hidden = [torch.randn(len(c), 8) for c in channels]
    embeds = [torch.cat([x, c.float()], dim=1) for x, c in zip(hidden, channels)]
    if steps == "one":
        schedule = [(0, embeds)]
    elif steps == "per_item":
        schedule = [(at[0] - 1, [e]) for at, e in zip(embed_at, embeds)]
    else:
        split = 3
        schedule = [(0, [embeds[0][:split]]), (embed_at[0][split], [embeds[0][split:], *embeds[1:]])]
    stripped = []
    for num_computed, step_embeds in schedule:
        out, positions, delta = Ours.recompute_mrope_positions(
            stub, ids, step_embeds, positions, num_computed)
        stripped += out
    assert torch.equal(torch.cat(stripped), torch.cat(hidden))

    # Expected: the unpruned positions of exactly the tokens the pruned prompt keeps.
    keep, cursor = [], 0
    for (modality, _), s, at_full, feature in zip(grids, slots, full_at, full_features):
        start = feature.mm_position.offset
        keep += range(cursor, start)
        if modality == "image":
            keep += [at_full[i] for i in s]
            cursor = at_full[-1] + 1
        else:
            keep += range(start, start + feature.mm_position.length)
            cursor = start + feature.mm_position.length
    keep += range(cursor, len(full_ids))
    assert positions.tolist() == full_pos[:, keep].tolist()
    assert len(ids) + delta == len(full_ids) + full_delta


# ---- the engine -----------------------------------------------------------------------------


def _with_budget(request, ratios):
    if ratios == DEFAULT or "multi_modal_data" not in request:
        return request
    return {**request, "mm_processor_kwargs": {"visionzip_dominant_ratio": ratios[0],
                                               "visionzip_contextual_ratio": ratios[1]}}


@pytest.mark.slow
@pytest.mark.parametrize("ratios", [DEFAULT, (0.1, 0.02)])
def test_greedy_tokens_of_mixed_batch_match_hf_reference(engine, hf, ratios):
    """vLLM + plugin == HF + reference VisionZip on the mixed batch (images of several sizes,
    the smallest included, a two-image prompt, text-only prompts in one batch); a non-default
    budget is the requests' own (mm_processor_kwargs). Each image's placeholder count is
    D + C of its own token count, and the stats report it."""
    from vllm import SamplingParams

    model, processor = hf
    specs = mixed_batch()
    tokenizer = engine.get_tokenizer()
    requests = [_with_budget(build_request(tokenizer, s), ratios) for s in specs]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = engine.generate(requests, params, use_tqdm=False)
    for spec, request, output in zip(specs, requests, outputs):
        images = [i.build() for i in spec.images]
        want = ref.generate(model, processor, request["prompt"], images, *ratios, MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == want, spec
        grids = processor.image_processor(images=images).image_grid_thw if images else []
        after = [sum(visionzip_counts(int(g.prod()) // 4, *ratios)) for g in grids]
        image_token = model.config.image_token_id
        assert output.prompt_token_ids.count(image_token) == sum(after)
        stats = (output.kv_transfer_params or {}).get("vllm_glimpse")
        if images:
            assert stats["image_tokens_per_image_after"] == after
            assert stats["image_tokens_per_image_before"] == [int(g.prod()) // 4 for g in grids]
        else:
            assert not stats


@pytest.mark.slow
def test_placeholder_counts_are_fixed_at_prompt_processing(engine):
    """Any image size: the prompt the engine schedules already holds D + C image tokens
    (decided by the processor from the image's grid, before the ViT runs)."""
    from vllm import SamplingParams

    tokenizer = engine.get_tokenizer()
    sizes = [(33, 47), (64, 64), (1000, 90), (517, 301), (96, 1400)]
    specs = [types.SimpleNamespace(text="Hi.", images=(ImageSpec("noise", w, h, i),))
             for i, (w, h) in enumerate(sizes)]
    outputs = engine.generate([build_request(tokenizer, s) for s in specs],
                              SamplingParams(max_tokens=1), use_tqdm=False)
    processor = AutoProcessor.from_pretrained(engine.llm_engine.model_config.model)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for spec, output in zip(specs, outputs):
        grid = processor.image_processor(images=[spec.images[0].build()]).image_grid_thw[0]
        n = int(grid.prod()) // 4
        assert output.prompt_token_ids.count(image_token) == sum(visionzip_counts(n, *DEFAULT))


@pytest.mark.slow
def test_video_passes_through_unpruned(engine, hf):
    """A video (4 frames, 2 after the temporal merge, each its own run of tokens after its
    timestamp) is not pruned: vLLM + plugin decodes exactly as transformers' generate."""
    from transformers.video_utils import VideoMetadata
    from vllm import SamplingParams

    model, processor = hf
    frames = np.stack([np.asarray(ImageSpec("gradient", 96, 64, s).build()) for s in range(4)])
    timing = dict(fps=2.0, duration=2.0, total_num_frames=4, frames_indices=[0, 1, 2, 3],
                  video_backend="opencv")
    messages = [{"role": "user", "content": [{"type": "video"},
                                             {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], videos=[frames], video_metadata=[VideoMetadata(**timing)],
                       do_sample_frames=False, return_tensors="pt")
    want = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    request = {"prompt": prompt,
               "multi_modal_data": {"video": (frames, {**timing, "do_sample_frames": False})}}
    (output,) = engine.generate([request], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                          ignore_eos=True), use_tqdm=False)
    assert list(output.outputs[0].token_ids) == want[0, inputs.input_ids.shape[1]:].tolist()
    assert len(output.prompt_token_ids) == inputs.input_ids.shape[1]


def test_glimpse_is_refused_at_startup_in_one_line(path, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_glimpse

    args = EngineArgs(model=path, **TINY_ENGINE_ARGS,
                      **vllm_glimpse.engine_kwargs("glimpse", checkpoint=str(tmp_path)))
    with pytest.raises(Exception) as info:
        args.create_engine_config()
    assert ("pruning method 'glimpse' is not available for Qwen3-VL "
            "(Qwen3VLForConditionalGeneration): no GlimpsePrune checkpoint has been released "
            "for it; available: none, visionzip") in str(info.value)


def test_request_budget_out_of_range_is_refused_in_one_line(engine):
    tokenizer = engine.get_tokenizer()
    request = build_request(tokenizer, mixed_batch()[0])
    request["mm_processor_kwargs"] = {"visionzip_dominant_ratio": 0.9,
                                      "visionzip_contextual_ratio": 0.2}
    with pytest.raises(ValueError, match="visionzip_dominant_ratio \\+ "
                       "visionzip_contextual_ratio = 0.9 \\+ 0.2 exceeds 1"):
        engine.generate([request], use_tqdm=False)


def test_extreme_aspect_ratio_is_refused_in_one_line(engine):
    """The HF processor refuses an aspect ratio of 200:1 or more; the request fails with a
    line naming the image and the limit, and the engine keeps serving."""
    tokenizer = engine.get_tokenizer()
    bad = build_request(tokenizer, types.SimpleNamespace(
        text="Hi.", images=(ImageSpec("noise", 1000, 4, 0),)))
    with pytest.raises(ValueError, match="image 1 is 1000x4 px: Qwen3-VL takes images whose "
                                         "longer side is less than 200 times the shorter one"):
        engine.generate([bad], use_tqdm=False)
    good = build_request(tokenizer, mixed_batch()[5])
    assert len(engine.generate([good], use_tqdm=False)[0].outputs[0].token_ids) > 0
