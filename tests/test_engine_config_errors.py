"""Bad settings fail while vLLM builds its config (before any engine starts), with our message."""

import json

import pytest
from vllm.engine.arg_utils import EngineArgs

import vllm_glimpse


def _engine_config(model, **kwargs):
    return EngineArgs(model=str(model), **kwargs).create_engine_config()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2,
        "vocab_size": 1000, "max_position_embeddings": 2048,
    }))
    with pytest.raises(ValueError) as info:
        _engine_config(tmp_path, **vllm_glimpse.engine_kwargs("none"))
    assert "vllm-glimpse does not support model architecture ['LlamaForCausalLM']" in str(info.value)


def test_method_not_available_for_model(tiny_models):
    with pytest.raises(ValueError) as info:
        _engine_config(tiny_models["llava_next"], **vllm_glimpse.engine_kwargs("glimpse"))
    assert "pruning method 'glimpse' is not available for LLaVA-NeXT" in str(info.value)


def test_settings_reach_the_engine_config(tiny_models):
    config = _engine_config(tiny_models["qwen2_5_vl"], **vllm_glimpse.engine_kwargs("none"))
    assert config.model_config.architectures == ["PruningQwen2_5_VLForConditionalGeneration"]
    assert config.model_config.hf_config.vllm_glimpse == {"method": "none"}
