"""Settings: parsing, validation against the model, and how they reach vLLM's HF config."""

import pickle

import pytest
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    Qwen2_5_VLConfig,
    SiglipVisionConfig,
)

import vllm_glimpse
from vllm_glimpse.settings import (
    SETTINGS_ATTR,
    PruningConfig,
    PruningOverrides,
    PruningSettingsError,
    pruning_config_of,
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "zip"}, "unknown pruning method 'zip'; choose one of: none, visionzip, glimpse"),
        ({"method": "visionzip", "dominat": 3}, "unknown setting 'dominat' for method 'visionzip'"),
        ({"method": "none", "threshold": 0.5}, "unknown setting 'threshold' for method 'none'"),
        ({"method": "glimpse", "dominant": 5}, "unknown setting 'dominant' for method 'glimpse'"),
        ({"method": "visionzip", "dominant": 0}, "dominant must be >= 1, got 0"),
        ({"method": "visionzip", "contextual": -1}, "contextual must be >= 0, got -1"),
        ({"method": "visionzip", "dominant": 5.5}, "dominant must be an integer, got 5.5"),
        ({"method": "visionzip", "dominant_ratio": 0.0}, "dominant_ratio must be in (0.0, 1.0]"),
        ({"method": "visionzip", "contextual_ratio": 1.5}, "contextual_ratio must be in [0.0, 1.0]"),
        ({"method": "glimpse", "threshold": 1.5}, "threshold must be in [0.0, 1.0], got 1.5"),
        ({"method": "glimpse", "threshold": float("nan")}, "threshold must be in [0.0, 1.0]"),
        ({"method": "glimpse", "max_ratio": 0}, "max_ratio must be in (0.0, 1.0], got 0.0"),
        ({"method": "glimpse", "min_keep": True}, "min_keep must be an integer, got True"),
        ({"method": "glimpse", "min_keep": 0}, "min_keep must be >= 1, got 0"),
        ({"method": "glimpse", "layer": -1}, "layer must be >= 0, got -1"),
        ({"method": "glimpse", "checkpoint": ""}, "checkpoint must be a non-empty string"),
        ({"method": "glimpse", "threshold": "high"}, "threshold must be a number, got 'high'"),
    ],
)
def test_bad_settings_raise_one_clear_error(kwargs, message):
    with pytest.raises(PruningSettingsError) as info:
        vllm_glimpse.engine_kwargs(**kwargs)
    assert message in str(info.value)


def test_settings_round_trip_through_dict_and_pickle():
    config = PruningConfig.parse("visionzip", dominant=108, contextual=20)
    assert config.to_dict() == {"method": "visionzip", "dominant": 108, "contextual": 20}
    assert PruningConfig.from_dict(config.to_dict()) == config
    overrides = vllm_glimpse.engine_kwargs("glimpse", threshold=0.3, max_ratio=0.111)["hf_overrides"]
    # vLLM pickles the engine config into its engine-core and worker processes.
    assert pickle.loads(pickle.dumps(overrides)) == overrides
    assert PruningConfig.parse("VisionZip").method == "visionzip"
    assert PruningConfig.from_dict(None) == PruningConfig()


def _qwen_config():
    return Qwen2_5_VLConfig(architectures=["Qwen2_5_VLForConditionalGeneration"])


def _llava_config(vision=None):
    return LlavaConfig(vision_config=vision, architectures=["LlavaForConditionalGeneration"])


def test_overrides_switch_architecture_and_carry_settings():
    hf_config = _qwen_config()
    overrides = vllm_glimpse.engine_kwargs("none", hf_overrides={"max_window_layers": 7})
    out = overrides["hf_overrides"](hf_config)
    assert out.architectures == ["PruningQwen2_5_VLForConditionalGeneration"]
    assert getattr(out, SETTINGS_ATTR) == {"method": "none"}
    assert pruning_config_of(out) == PruningConfig()
    assert out.max_window_layers == 7  # the user's own overrides are applied too
    # Applying twice (vLLM may re-create the model config) is harmless.
    assert overrides["hf_overrides"](out).architectures == out.architectures

    llava = PruningOverrides(PruningConfig())(_llava_config())
    assert llava.architectures == ["PruningLlavaForConditionalGeneration"]
    next_ = PruningOverrides(PruningConfig())(
        LlavaNextConfig(architectures=["LlavaNextForConditionalGeneration"]))
    assert next_.architectures == ["VisionZipLlavaNextForConditionalGeneration"]


def test_vllm_placeholder_probe_passes_through():
    from transformers import PretrainedConfig

    probe = PretrainedConfig(architectures=[""], model_type="dummy_qwen2_5_vl")
    out = PruningOverrides(PruningConfig())(probe)
    assert out.model_type == "dummy_qwen2_5_vl" and not hasattr(out, SETTINGS_ATTR)


def test_unsupported_architecture_is_named():
    with pytest.raises(PruningSettingsError) as info:
        PruningOverrides(PruningConfig())(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert "does not support model architecture ['LlamaForCausalLM']" in str(info.value)
    assert "Qwen2_5_VLForConditionalGeneration" in str(info.value)


def test_llava_with_non_clip_tower_is_rejected():
    with pytest.raises(PruningSettingsError) as info:
        PruningOverrides(PruningConfig())(_llava_config(SiglipVisionConfig()))
    assert "CLIP vision tower" in str(info.value) and "siglip_vision_model" in str(info.value)


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"dominant": 54}, "visionzip on Qwen2.5-VL takes ratios of each image's tokens"),
        ({"dominant_ratio": 0.9, "contextual_ratio": 0.2},
         "dominant_ratio + contextual_ratio = 0.9 + 0.2 exceeds 1"),
    ],
)
def test_qwen_visionzip_settings_are_checked_against_the_model(knobs, message):
    with pytest.raises(PruningSettingsError) as info:
        PruningOverrides(PruningConfig.parse("visionzip", **knobs))(_qwen_config())
    assert message in str(info.value)


def test_qwen_visionzip_defaults_are_the_authors():
    from vllm_glimpse.settings import visionzip_budget, visionzip_ratios

    out = PruningOverrides(PruningConfig.parse("visionzip"))(_qwen_config())
    assert visionzip_ratios(out) == (0.65, 0.05)
    assert visionzip_budget(out) is None  # counts are LLaVA's
    out = PruningOverrides(PruningConfig.parse("visionzip", dominant_ratio=0.45))(_qwen_config())
    assert visionzip_ratios(out) == (0.45, 0.05)
