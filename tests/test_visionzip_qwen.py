"""VisionZip on Qwen2.5-VL: selection and token order against the independent HF reference (the
authors' Qwen order: kept slots in raster order, each contextual token in its target's slot),
M-RoPE positions of the pruned layout against the unpruned one (through vLLM's own position
recompute), and greedy tokens of vLLM + plugin against HF transformers + reference VisionZip on
the same weights."""

import types

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from tests.engine_reference import assert_engine_matches_reference
from tests.reference.visionzip_hf import (
    qwen_generate,
    qwen_greedy,
    qwen_image_sequence,
    qwen_prefill,
    qwen_visionzip_image,
    qwen_vit_capture,
)
from vllm_glimpse.settings import visionzip_counts
from vllm_glimpse.testing.workloads import mixed_batch
from vllm_glimpse.visionzip import visionzip

MAX_TOKENS = 12
RATIOS = [(0.65, 0.05), (0.45, 0.05), (0.1, 0.02), (1.0, 0.0)]


@pytest.fixture(scope="module")
def hf_qwen(tiny_models):
    path = tiny_models["qwen2_5_vl"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


def _images():
    """448x448, 640x360 (wide), 280x504 (tall), 224x392 and 56x56 (the smallest: 4 tokens)."""
    return [image.build() for spec in mixed_batch() for image in spec.images]


@pytest.mark.parametrize("dominant_ratio, contextual_ratio", RATIOS)
def test_selection_merge_and_order_match_reference(hf_qwen, dominant_ratio, contextual_ratio):
    """Our VisionZip on the same block's query/key gives the reference's kept slots and, in the
    authors' Qwen order (kept slots in raster order, each contextual token in its target's
    slot), the same token sequence; the LLaVA order (contextual tokens after the dominant ones)
    gives another sequence wherever a target precedes a dominant token."""
    from vllm_glimpse.models.qwen_visionzip import merged_scores_and_keys

    model, processor = hf_qwen
    visual = model.model.visual
    old_order_differs = 0
    for image in _images():
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        grid = inputs.image_grid_thw
        image_embeds, select_mask, target_slots, contextual_tokens = qwen_visionzip_image(
            visual, inputs.pixel_values, grid, dominant_ratio, contextual_ratio)
        want_tokens, want_slots = qwen_image_sequence(
            image_embeds, select_mask, target_slots, contextual_tokens)

        # Our scoring and selection on the same block's query/key (window order).
        embeds, q, k, reverse = qwen_vit_capture(visual, inputs.pixel_values, grid)
        scores, keys = merged_scores_and_keys(
            q.transpose(0, 1), k.transpose(0, 1), [int(grid.prod())], visual.spatial_merge_unit,
            reverse)
        dominant, contextual = visionzip_counts(embeds.shape[0], dominant_ratio, contextual_ratio)
        got = visionzip(embeds, scores, keys, dominant, contextual, order="raster")
        assert got.tokens.shape[0] == want_tokens.shape[0] == dominant + contextual
        assert got.slots.tolist() == want_slots.tolist()
        assert got.target_index.tolist() == target_slots.tolist()
        is_target = torch.zeros_like(select_mask)
        is_target[target_slots] = True
        assert got.dominant_index.tolist() == torch.nonzero(select_mask & ~is_target).flatten().tolist()
        torch.testing.assert_close(got.tokens, want_tokens, rtol=1e-5, atol=1e-5)

        old = visionzip(embeds, scores, keys, dominant, contextual, order="dominant_first")
        torch.testing.assert_close(old.tokens[dominant:], contextual_tokens, rtol=1e-5, atol=1e-5)
        if dominant and contextual and int(target_slots.min()) < int(got.dominant_index.max()):
            assert not torch.allclose(old.tokens, want_tokens, rtol=1e-5, atol=1e-5)
            old_order_differs += 1
    if contextual_ratio:  # the images of the batch really tell the two orders apart
        assert old_order_differs >= 3


def test_counts_follow_the_authors_ratios():
    assert visionzip_counts(256, 0.65, 0.05) == (166, 12)  # int(166.4), max(int(12.8), 1)
    assert visionzip_counts(4, 0.65, 0.05) == (2, 1)  # the smallest image: C is at least 1
    assert visionzip_counts(4, 1.0, 0.05) == (4, 0)  # D + C never exceeds N
    assert visionzip_counts(4, 0.1, 0.0) == (1, 0)  # at least one token is kept
    assert visionzip_counts(100, 0.5, 0.0) == (50, 0)


# ---- positions ----------------------------------------------------------------------------


def _qwen_stub(hf_config, ratios):
    """Just enough of the model for its position methods (no weights, no engine)."""
    from vllm_glimpse.models.qwen2_5_vl import PruningQwen2_5_VLForConditionalGeneration as Ours

    stub = types.SimpleNamespace(config=hf_config, visionzip_ratios=ratios)
    stub.iter_mm_grid_thw = types.MethodType(Ours.iter_mm_grid_thw, stub)
    return stub


def _prompt(config, items, lengths, text_lengths):
    """Token ids text, (vision_start, media tokens, vision_end, text) per media item, and the
    placeholder ranges of the items."""
    from vllm.multimodal.inputs import PlaceholderRange

    ids, ranges = [7] * text_lengths[0], []
    for (modality, _), n, text in zip(items, lengths, text_lengths[1:]):
        token = config.image_token_id if modality == "image" else config.video_token_id
        ids.append(config.vision_start_token_id)
        ranges.append(PlaceholderRange(offset=len(ids), length=n))
        ids += [token] * n + [config.vision_end_token_id] + [7] * text
    return ids, ranges


def _features(items, ranges):
    one = types.SimpleNamespace(data=torch.tensor(1.0))  # second_per_grid_ts of the video
    return [
        types.SimpleNamespace(
            modality=modality, mm_position=r,
            data={f"{modality}_grid_thw": types.SimpleNamespace(data=torch.tensor(g)),
                  **({"second_per_grid_ts": one} if modality == "video" else {})})
        for (modality, g), r in zip(items, ranges)
    ]


@pytest.mark.parametrize("steps", ["one", "at_vision_start", "after_vision_start", "mid_image"])
def test_positions_of_pruned_layout_equal_unpruned(tiny_models, steps):
    """Kept image tokens sit at their original (t, h, w) positions, contextual tokens at their
    targets', text after each image and decoding continue exactly as without pruning. Runs our
    get_mrope_input_positions, then our recompute_mrope_positions on embeddings carrying the
    position channels, as the runner calls them: the whole prompt in one step, one image per
    step (the step starting at or just after the image's vision-start token), or an image split
    across two steps (chunked prefill)."""
    from transformers import AutoConfig
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Vanilla

    from vllm_glimpse.models.qwen2_5_vl import PruningQwen2_5_VLForConditionalGeneration as Ours
    from vllm_glimpse.models.qwen_visionzip import media_positions

    config = AutoConfig.from_pretrained(tiny_models["qwen2_5_vl"])
    # Images: square, wide, tall, the smallest; and a video (not pruned, all tokens kept), whose
    # temporal positions step by second_per_grid_ts * tokens_per_second.
    items = [("image", [1, 32, 32]), ("image", [1, 12, 22]), ("video", [2, 8, 12]),
             ("image", [1, 36, 20]), ("image", [1, 4, 4])]
    t_factor = config.vision_config.tokens_per_second * 1.0
    rng = np.random.default_rng(0)
    # Per item: the kept slots in the order the model emits them (raster order, a contextual
    # token in its target's slot: the slot carries the position), and their position channels.
    kept, channels = [], []
    for modality, (t, h, w) in items:
        grid = media_positions(t, h // 2, w // 2, t_factor if modality == "video" else 1.0)
        n = grid.shape[0]
        if modality == "video":
            kept.append(np.arange(n))
        else:
            d, c = visionzip_counts(n, 0.45, 0.05)
            kept.append(np.sort(rng.permutation(n)[:d + c]))
        channels.append(grid[kept[-1]])
    texts = [5, 3, 4, 2, 6, 3]

    full_ids, full_ranges = _prompt(config, items, [len(grid_positions) for grid_positions in
                                                    (media_positions(t, h // 2, w // 2)
                                                     for _, (t, h, w) in items)], texts)
    vanilla = _qwen_stub(config, None)
    full_pos, full_delta = Vanilla.get_mrope_input_positions(
        vanilla, full_ids, _features(items, full_ranges))

    ids, ranges = _prompt(config, items, [len(k) for k in kept], texts)
    ours = _qwen_stub(config, (0.45, 0.05))
    positions, _ = Ours.get_mrope_input_positions(ours, ids, _features(items, ranges))
    hidden = [torch.randn(len(k), 8) for k in kept]
    embeds = [torch.cat([x, ch.float()], dim=1) for x, ch in zip(hidden, channels)]
    # (tokens computed before the step, the embedding rows the step gathers), as the runner
    # passes them.
    if steps == "one":
        schedule = [(0, embeds)]
    elif steps in ("at_vision_start", "after_vision_start"):
        shift = 1 if steps == "at_vision_start" else 0
        schedule = [(r.offset - shift, [e]) for r, e in zip(ranges, embeds)]
    else:
        split = 3
        schedule = [(0, [embeds[0][:split]]),
                    (ranges[0].offset + split, [embeds[0][split:], *embeds[1:]])]
    stripped = []
    for num_computed, step_embeds in schedule:
        out, positions, delta = Ours.recompute_mrope_positions(
            ours, ids, step_embeds, positions, num_computed)
        stripped += out
    assert torch.equal(torch.cat(stripped), torch.cat(hidden))

    # Expected: the unpruned positions of exactly the tokens the pruned prompt keeps.
    keep = list(range(full_ranges[0].offset))
    for full_range, k, nxt in zip(full_ranges, kept, full_ranges[1:] + [None]):
        keep += (full_range.offset + k).tolist()
        text_end = nxt.offset if nxt is not None else len(full_ids)
        keep += range(full_range.offset + full_range.length, text_end)
    assert positions.tolist() == full_pos[:, keep].tolist()
    # Decoding continues at the same position: P + delta == P_full + delta_full.
    assert len(ids) + delta == len(full_ids) + full_delta


# ---- the engine ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dominant_ratio, contextual_ratio", [(0.65, 0.05), (0.1, 0.02)])
def test_greedy_tokens_match_hf_reference(tiny_models, hf_qwen, dominant_ratio, contextual_ratio):
    """vLLM + plugin == HF + reference VisionZip on the mixed batch: images of several sizes (the
    smallest included), a two-image prompt and text-only prompts in one batch."""
    model, processor = hf_qwen
    assert_engine_matches_reference(
        tiny_models["qwen2_5_vl"], "visionzip",
        {"dominant_ratio": dominant_ratio, "contextual_ratio": contextual_ratio},
        lambda prompt, images: qwen_generate(model, processor, prompt, images, dominant_ratio,
                                             contextual_ratio, MAX_TOKENS),
        MAX_TOKENS)


def _dominant_first(inputs_embeds, position_ids, image_of, is_contextual):
    """The LLaVA order on a Qwen prefill: in each image, the contextual tokens moved after the
    dominant ones, each with its position (the plugin's order before the authors' Qwen order)."""
    order, i = [], 0
    while i < len(image_of):
        if image_of[i] < 0:
            order.append(i)
            i += 1
            continue
        span = torch.nonzero(image_of == image_of[i]).flatten().tolist()
        order += [j for j in span if not is_contextual[j]] + [j for j in span if is_contextual[j]]
        i = span[-1] + 1
    return inputs_embeds[order], position_ids[:, order]


def test_old_order_fails_against_reference(tiny_models, hf_qwen):
    """The reference (the authors' Qwen order) and the order used before (each image's contextual
    tokens after its dominant ones, positions unchanged) feed the LLM different sequences, and
    the LLM's greedy tokens tell them apart on the mixed batch: the order is observable, so
    test_greedy_tokens_match_hf_reference, where the engine matches the reference, rules the old
    order out."""
    from transformers import AutoTokenizer

    from vllm_glimpse.testing.workloads import build_request

    model, processor = hf_qwen
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2_5_vl"])
    differ = 0
    for spec in mixed_batch():
        if not spec.images:
            continue
        prompt = build_request(tokenizer, spec)["prompt"]
        embeds, positions, image_of, is_contextual = qwen_prefill(
            model, processor, prompt, [img.build() for img in spec.images], 0.65, 0.05)
        old_embeds, old_positions = _dominant_first(embeds, positions, image_of, is_contextual)
        assert int(is_contextual.sum()) >= len(spec.images)  # every image has contextual tokens
        assert sorted(map(tuple, old_positions.T.tolist())) == sorted(map(tuple, positions.T.tolist()))
        assert not torch.equal(old_embeds, embeds)
        want = qwen_greedy(model, embeds, positions, MAX_TOKENS)
        differ += qwen_greedy(model, old_embeds, old_positions, MAX_TOKENS) != want
    assert differ >= 2  # 4 of the 5 image prompts on the tiny model


def _process(model: str, method: str, image, *, embeds: bool = False):
    """One request through vLLM's input processing only (no engine): the prompt's image
    placeholder lengths, or the error a user gets."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    import vllm_glimpse
    from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS
    from vllm_glimpse.testing.tiny_models import tiny_model_path

    config = EngineArgs(model=str(tiny_model_path(model)), **TINY_ENGINE_ARGS,
                        enable_mm_embeds=embeds,
                        **vllm_glimpse.engine_kwargs(method)).create_engine_config()
    if embeds:
        hidden = config.model_config.hf_config.text_config.hidden_size
        image = {"image_embeds": torch.zeros(16, hidden), "image_grid_thw": torch.tensor([[1, 8, 8]])}
    prompt = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>Describe.",
              "multi_modal_data": {"image": image}}
    processed = InputProcessor(config).process_inputs("r", prompt, SamplingParams(max_tokens=1),
                                                      ("generate",))
    return [f.mm_position.length for f in processed.mm_features]


QWEN_FAMILY = {"qwen2_5_vl": "Qwen2.5-VL", "qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL"}


@pytest.mark.parametrize("model", list(QWEN_FAMILY))
def test_precomputed_image_embeds_are_refused_clearly(model):
    """VisionZip scores tokens by the ViT's attention: an image given as embeddings cannot be
    pruned, and the request fails in input processing (the engine never sees it) with one line;
    the plugin's variant with pruning off takes them as vLLM does (16 tokens for a 1 x 8 x 8
    grid)."""
    with pytest.raises(ValueError, match=f"VisionZip on {QWEN_FAMILY[model]} needs pixel images"):
        _process(model, "visionzip", None, embeds=True)
    assert _process(model, "none", None, embeds=True) == [16]


@pytest.mark.parametrize("model", list(QWEN_FAMILY))
def test_aspect_ratio_of_arrays_and_tensors_is_read_as_vllm_reads_them(model):
    """Images given as an HWC array or an HWC tensor in a list (vLLM reads both as height x
    width x channels; a bare 3-D tensor would be taken for embeddings): 40 x 1000 px is served
    (aspect 25), 20 x 4100 px is refused in one line (aspect >= 200, which the HF processor
    cannot resize)."""
    import numpy as np

    name = QWEN_FAMILY[model]
    for image in (np.zeros((40, 1000, 3), np.uint8), torch.zeros(40, 1000, 3, dtype=torch.uint8)):
        assert len(_process(model, "visionzip", [image])) == 1
    for image in (np.zeros((20, 4100, 3), np.uint8), torch.zeros(20, 4100, 3, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=f"image 1 is 4100x20 px: {name} takes images whose "
                                             "longer side is less than 200 times the shorter one"):
            _process(model, "visionzip", [image])
