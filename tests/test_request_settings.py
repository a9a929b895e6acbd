"""Per-request pruning settings through ``mm_processor_kwargs`` (``visionzip_dominant``, ...):
validated like the engine's, part of the multimodal hash, and each request of one batch runs
its own budget (greedy tokens against the HF reference with that budget)."""

import pytest
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine.input_processor import InputProcessor

import vllm_glimpse
from tests.reference.visionzip_hf import llava_generate, qwen_generate
from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS, make_llm, shutdown
from vllm_glimpse.testing.workloads import build_request, mixed_batch

MAX_TOKENS = 8


def _processor(path, **engine_kwargs):
    config = EngineArgs(model=str(path), **TINY_ENGINE_ARGS, **engine_kwargs).create_engine_config()
    return InputProcessor(config)


def _process(processor, request, overrides):
    if overrides is not None:
        request = dict(request, mm_processor_kwargs=overrides)
    out = processor.process_inputs("r", request, SamplingParams(max_tokens=1), ("generate",))
    return [(f.identifier, f.mm_position.length) for f in out.mm_features]


@pytest.mark.parametrize("model, overrides, lengths", [
    ("llava", {"visionzip_dominant": 108, "visionzip_contextual": 20}, [128, 128]),
    ("llava_next", {"visionzip_dominant": 20, "visionzip_contextual": 4}, [72, 72]),
    ("qwen2_5_vl", {"visionzip_dominant_ratio": 0.45}, [64 + 7, 50 + 5]),
])
def test_request_budget_sets_placeholders_and_hash(tiny_models, model, overrides, lengths):
    path = tiny_models[model]
    request = build_request(AutoTokenizer.from_pretrained(path), mixed_batch()[4])  # two images
    processor = _processor(path, **vllm_glimpse.engine_kwargs("visionzip"))
    default = _process(processor, request, None)
    overridden = _process(processor, request, overrides)
    assert [n for _, n in overridden] == lengths != [n for _, n in default]
    assert {h for h, _ in overridden}.isdisjoint(h for h, _ in default)
    assert _process(processor, request, overrides) == overridden  # same settings, same hashes


@pytest.mark.parametrize("model, overrides, message", [
    ("llava", {"visionzip_dominant": 0}, "mm_processor_kwargs: visionzip_dominant must be >= 1"),
    ("llava", {"visionzip_dominant": 600},
     "visionzip_dominant + visionzip_contextual = 600 + 10 exceeds the 577 tokens"),
    ("llava", {"visionzip_dominant_ratio": 0.5}, "takes token counts"),
    ("llava", {"glimpse_threshold": 0.3},
     "'glimpse_threshold' does not apply: this engine runs pruning method 'visionzip'"),
    ("qwen2_5_vl", {"visionzip_dominant_ratio": 0.9, "visionzip_contextual_ratio": 0.2},
     "exceeds 1"),
])
def test_bad_request_settings_are_refused_before_the_engine(tiny_models, model, overrides, message):
    path = tiny_models[model]
    request = build_request(AutoTokenizer.from_pretrained(path), mixed_batch()[0])
    processor = _processor(path, **vllm_glimpse.engine_kwargs("visionzip"))
    with pytest.raises(ValueError, match="mm_processor_kwargs") as info:
        _process(processor, request, overrides)
    assert message in str(info.value)


def test_request_settings_need_a_pruning_engine(tiny_models):
    path = tiny_models["llava"]
    request = build_request(AutoTokenizer.from_pretrained(path), mixed_batch()[0])
    with pytest.raises(ValueError, match="this engine runs pruning method 'none'"):
        _process(_processor(path, **vllm_glimpse.engine_kwargs("none")), request,
                 {"visionzip_dominant": 54})


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llava", "qwen2_5_vl"])
def test_each_request_of_a_batch_runs_its_own_budget(tiny_models, model):
    path = tiny_models[model]
    if model == "llava":
        hf = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
        default, budgets = (54, 10), [None, (108, 20), (7, 0), None]
        knob_names, reference = ("visionzip_dominant", "visionzip_contextual"), llava_generate
    else:
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
        default, budgets = (0.65, 0.05), [None, (0.3, 0.1), (0.1, 0.0), None]
        knob_names, reference = ("visionzip_dominant_ratio", "visionzip_contextual_ratio"), qwen_generate
    processor = AutoProcessor.from_pretrained(path)
    specs = [mixed_batch()[i] for i in (0, 0, 4, 3)]  # same image twice, two images, text only
    llm = make_llm(path, method="visionzip")
    try:
        tokenizer = llm.get_tokenizer()
        prompts = []
        for spec, budget in zip(specs, budgets):
            prompt = build_request(tokenizer, spec)
            if budget is not None:
                prompt["mm_processor_kwargs"] = dict(zip(knob_names, budget))
            prompts.append(prompt)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        ours = [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        shutdown(llm)
    for spec, budget, got, prompt, out in zip(specs, budgets, ours, prompts, outputs):
        images = [i.build() for i in spec.images]
        want = reference(hf.eval(), processor, prompt["prompt"], images,
                         *(budget or default), MAX_TOKENS)
        assert got == want, f"{spec} with {budget}"
        # the request's stats: what each image would take unpruned, and what it took
        stats = (out.kv_transfer_params or {}).get("vllm_glimpse")
        if not images:
            assert stats is None
            continue
        before, after = _visionzip_counts(hf.config, processor, images, budget or default)
        assert stats == {
            "method": "visionzip", "image_tokens_before": sum(before), "image_tokens_after": sum(after),
            "image_tokens_per_image_before": before, "image_tokens_per_image_after": after,
            "prompt_tokens_before": len(out.prompt_token_ids) + sum(before) - sum(after),
            "prompt_tokens_after": len(out.prompt_token_ids),
        }, spec
    assert ours[0] != ours[1]  # the same image under two budgets


def _visionzip_counts(config, processor, images, budget):
    """(tokens per image unpruned, kept per image): LLaVA-1.5 keeps D + C of its patch grid;
    Qwen2.5-VL int(r_d N) + max(int(r_c N), 1) (none for r_c = 0) of its N merged tokens."""
    if config.model_type == "llava":
        vision = config.vision_config
        unpruned = (vision.image_size // vision.patch_size) ** 2
        return [unpruned] * len(images), [int(budget[0] + budget[1])] * len(images)
    grids = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    before = [int(g.prod()) // config.vision_config.spatial_merge_size ** 2 for g in grids]
    after = [int(n * budget[0]) + (max(int(n * budget[1]), 1) if budget[1] > 0 else 0) for n in before]
    return before, after


@pytest.mark.parametrize("overrides, message", [
    ({"glimpse_threshold": 1.5},
     "mm_processor_kwargs: glimpse_threshold must be in [0.0, 1.0], got 1.5"),
    ({"glimpse_max_ratio": 0}, "glimpse_max_ratio must be in (0.0, 1.0]"),
    ({"glimpse_fixed_ratio": 0.3, "glimpse_threshold": 0.2},
     "glimpse_fixed_ratio keeps exactly int(fixed_ratio * N) tokens, so it cannot be combined "
     "with glimpse_threshold"),
    ({"glimpse_layer": 1}, "glimpse_layer is an engine setting (--glimpse-layer); a request may set "
                           "glimpse_threshold, glimpse_max_ratio, glimpse_min_keep, glimpse_fixed_ratio"),
    ({"glimpse_checkpoint": "/elsewhere"}, "glimpse_checkpoint is an engine setting"),
    # an unknown key: the error lists exactly the keys a request may set
    ({"glimpse_ratio": 0.2}, "mm_processor_kwargs: unknown setting 'glimpse_ratio' (a request may "
                             "set glimpse_threshold, glimpse_max_ratio, glimpse_min_keep, "
                             "glimpse_fixed_ratio)"),
    ({"visionzip_dominant": 54},
     "'visionzip_dominant' does not apply: this engine runs pruning method 'glimpse'"),
])
def test_bad_glimpse_request_settings_are_refused(tiny_models, tmp_path, overrides, message):
    from transformers import AutoConfig

    from vllm_glimpse.testing.glimpse_checkpoints import write_tiny_checkpoint

    path = tiny_models["qwen2_5_vl"]
    checkpoint = write_tiny_checkpoint(tmp_path / "gp", "qwen2_5_vl", AutoConfig.from_pretrained(path))
    request = build_request(AutoTokenizer.from_pretrained(path), mixed_batch()[0])
    processor = _processor(path, **vllm_glimpse.engine_kwargs("glimpse", checkpoint=str(checkpoint)))
    with pytest.raises(ValueError, match="mm_processor_kwargs") as info:
        _process(processor, request, overrides)
    assert message in str(info.value)
    # valid knobs pass and change the hash (the keep rule is part of the request's settings)
    plain = _process(processor, request, None)
    custom = _process(processor, request, {"glimpse_threshold": 0.2, "glimpse_min_keep": 4})
    assert [n for _, n in custom] == [n for _, n in plain]  # the prompt is pruned in the engine
    assert {h for h, _ in custom}.isdisjoint(h for h, _ in plain)
