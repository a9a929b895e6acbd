"""VisionZip on Qwen2-VL: vLLM + plugin against the independent HF reference on the same tiny
weights (one engine for the module, other budgets per request): kept slots and merged
embeddings of our vLLM ViT path, M-RoPE positions of the pruned prompt (a video left unpruned),
greedy tokens of the mixed batch, placeholder counts fixed when the prompt is processed."""

import types

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from tests.reference import visionzip_qwen_family_hf as ref
from tests.test_visionzip_qwen3 import _features, _images, _with_budget
from vllm_glimpse.settings import visionzip_counts
from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS, make_llm, shutdown
from vllm_glimpse.testing.tiny_models import tiny_model_path
from vllm_glimpse.testing.workloads import build_request, mixed_batch

MAX_TOKENS = 10
DEFAULT = (0.65, 0.05)


@pytest.fixture(scope="module")
def path():
    return str(tiny_model_path("qwen2_vl"))


@pytest.fixture(scope="module")
def hf(path):
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return model.eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(path):
    llm = make_llm(path, method="visionzip")
    yield llm
    shutdown(llm)


def test_reference_keeping_every_token_is_hf_generate(hf):
    model, processor = hf
    spec = mixed_batch()[4]  # two images
    prompt = build_request(processor.tokenizer, spec)["prompt"]
    images = [i.build() for i in spec.images]
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    want = out[0, inputs.input_ids.shape[1]:].tolist()
    assert ref.generate(model, processor, prompt, images, 1.0, 0.0, MAX_TOKENS) == want


@pytest.mark.parametrize("ratios", [DEFAULT, (0.1, 0.02), (1.0, 0.0)])
def test_kept_slots_and_merged_embeddings_match_reference(engine, hf, ratios):
    model, processor = hf
    visual = model.model.visual
    for image in _images():
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        grid = inputs.image_grid_thw
        features, select_mask, context_idx, context_tokens = ref.visionzip_image(
            visual, inputs.pixel_values, grid, *ratios)
        want, want_slots = ref.image_sequence(features[0], select_mask, context_idx,
                                              context_tokens[0])
        # vLLM normalises on the device: its ViT takes the resized image's raw bytes.
        raw = processor.image_processor(images=[image], return_tensors="pt", do_rescale=False,
                                        do_normalize=False).pixel_values.to(torch.uint8)

        def ours(vllm_model, pixel_values=raw, grid=grid):
            image_input = {"type": "pixel_values", "pixel_values": pixel_values,
                           "image_grid_thw": grid}
            return vllm_model._visionzip_images(image_input, [ratios])[0].cpu()

        got = engine.apply_model(ours)[0]
        n = int(grid.prod()) // 4
        assert got.shape == (sum(visionzip_counts(n, *ratios)), want.shape[1] + 3)
        torch.testing.assert_close(got[:, :-3], want, rtol=1e-3, atol=1e-3)
        _, h, w = grid[0].tolist()
        rows, cols = want_slots // (w // 2), want_slots % (w // 2)
        assert got[:, -3:].long().tolist() == torch.stack(
            [torch.zeros_like(rows), rows, cols], dim=1).tolist()


@pytest.mark.parametrize("steps", ["one", "per_item", "mid_image"])
def test_positions_of_pruned_layout_equal_unpruned(path, steps):
    """As for Qwen3-VL; a Qwen2-VL video is one run of tokens at (t, row, column)."""
    from transformers import AutoConfig
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration as Vanilla

    from vllm_glimpse.models.qwen2_vl import VisionZipQwen2VLForConditionalGeneration as Ours
    from vllm_glimpse.models.qwen_visionzip import media_positions

    config = AutoConfig.from_pretrained(path)
    grids = [("image", [1, 32, 32]), ("image", [1, 12, 22]), ("video", [2, 8, 12]),
             ("image", [1, 36, 20]), ("image", [1, 4, 4])]
    rng = np.random.default_rng(1)
    slots, channels = [], []
    for modality, (t, h, w) in grids:
        n = t * h * w // 4
        if modality == "video":
            slots.append(np.arange(n))
        else:
            slots.append(np.sort(rng.permutation(n)[:sum(visionzip_counts(n, 0.45, 0.05))]))
        channels.append(media_positions(t, h // 2, w // 2)[slots[-1]])
    texts = [5, 3, 4, 2, 6, 3]

    def prompt(pruned):
        ids, items, embed_at = [7] * texts[0], [], []
        for (modality, grid), s, text in zip(grids, slots, texts[1:]):
            count = len(s) if pruned else grid[0] * grid[1] * grid[2] // 4
            token = config.image_token_id if modality == "image" else config.video_token_id
            ids.append(config.vision_start_token_id)
            items.append((modality, grid, len(ids), count))
            embed_at.append(list(range(len(ids), len(ids) + count)))
            ids += [token] * count + [config.vision_end_token_id] + [7] * text
        return ids, _features(items), embed_at

    def stub(ratios):
        s = types.SimpleNamespace(config=config, visionzip_ratios=ratios)
        s.iter_mm_grid_thw = types.MethodType(Vanilla.iter_mm_grid_thw, s)
        s._unpruned_mrope_input_positions = types.MethodType(
            Ours._unpruned_mrope_input_positions, s)
        return s

    full_ids, full_features, full_at = prompt(False)
    full_pos, full_delta = Vanilla.get_mrope_input_positions(stub(None), full_ids, full_features)
    ids, features, embed_at = prompt(True)
    ours = stub((0.45, 0.05))
    positions, _ = Ours.get_mrope_input_positions(ours, ids, features)
    hidden = [torch.randn(len(c), 8) for c in channels]
    embeds = [torch.cat([x, c.float()], dim=1) for x, c in zip(hidden, channels)]
    if steps == "one":
        schedule = [(0, embeds)]
    elif steps == "per_item":
        schedule = [(at[0] - 1, [e]) for at, e in zip(embed_at, embeds)]
    else:
        schedule = [(0, [embeds[0][:3]]), (embed_at[0][3], [embeds[0][3:], *embeds[1:]])]
    stripped = []
    for num_computed, step_embeds in schedule:
        out, positions, delta = Ours.recompute_mrope_positions(
            ours, ids, step_embeds, positions, num_computed)
        stripped += out
    assert torch.equal(torch.cat(stripped), torch.cat(hidden))
    keep, cursor = [], 0
    for s, at_full in zip(slots, full_at):
        keep += range(cursor, at_full[0])
        keep += [at_full[i] for i in s]
        cursor = at_full[-1] + 1
    keep += range(cursor, len(full_ids))
    assert positions.tolist() == full_pos[:, keep].tolist()
    assert len(ids) + delta == len(full_ids) + full_delta


@pytest.mark.slow
@pytest.mark.parametrize("ratios", [DEFAULT, (0.1, 0.02)])
def test_greedy_tokens_of_mixed_batch_match_hf_reference(engine, hf, ratios):
    from vllm import SamplingParams

    model, processor = hf
    specs = mixed_batch()
    requests = [_with_budget(build_request(engine.get_tokenizer(), s), ratios) for s in specs]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = engine.generate(requests, params, use_tqdm=False)
    for spec, request, output in zip(specs, requests, outputs):
        images = [i.build() for i in spec.images]
        want = ref.generate(model, processor, request["prompt"], images, *ratios, MAX_TOKENS)
        assert list(output.outputs[0].token_ids) == want, spec
        grids = processor.image_processor(images=images).image_grid_thw if images else []
        after = [sum(visionzip_counts(int(g.prod()) // 4, *ratios)) for g in grids]
        assert output.prompt_token_ids.count(model.config.image_token_id) == sum(after)
        stats = (output.kv_transfer_params or {}).get("vllm_glimpse")
        assert (stats["image_tokens_per_image_after"] if images else stats) == (after or None)


def test_glimpse_is_refused_at_startup_in_one_line(path, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_glimpse

    args = EngineArgs(model=path, **TINY_ENGINE_ARGS,
                      **vllm_glimpse.engine_kwargs("glimpse", checkpoint=str(tmp_path)))
    with pytest.raises(Exception) as info:
        args.create_engine_config()
    assert ("pruning method 'glimpse' is not available for Qwen2-VL "
            "(Qwen2VLForConditionalGeneration): no GlimpsePrune checkpoint has been released "
            "for it; available: none, visionzip") in str(info.value)
