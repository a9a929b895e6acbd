"""The engine settings GlimpsePrune needs are applied when it is on, and conflicts are named.

Built with ``EngineArgs.create_engine_config`` (no engine starts)."""

from __future__ import annotations

import argparse

import pytest
from transformers import AutoConfig
from vllm.engine.arg_utils import EngineArgs

import vllm_glimpse
from vllm_glimpse import cli
from vllm_glimpse.engine.engine_config import CPU_WORKER_CLS, SCHEDULER_CLS
from vllm_glimpse.testing.glimpse_checkpoints import write_tiny_checkpoint


@pytest.fixture(scope="module")
def qwen_checkpoint(tiny_models, tmp_path_factory):
    path = tiny_models["qwen2_5_vl"]
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("gp") / "qwen", "qwen2_5_vl",
                                     AutoConfig.from_pretrained(path)))


def _config(model, **kwargs):
    return EngineArgs(model=str(model), **kwargs).create_engine_config()


def test_glimpse_turns_on_what_it_needs(tiny_models, qwen_checkpoint):
    config = _config(tiny_models["qwen2_5_vl"], max_model_len=4096, max_num_batched_tokens=1024,
                     **vllm_glimpse.engine_kwargs("glimpse", checkpoint=qwen_checkpoint))
    assert config.cache_config.enable_prefix_caching is False
    assert config.scheduler_config.enable_chunked_prefill is False
    assert config.scheduler_config.max_num_batched_tokens >= 4096  # any prompt fits in a step
    assert config.scheduler_config.async_scheduling is False
    assert config.model_config.enforce_eager is True
    assert config.scheduler_config.scheduler_cls == SCHEDULER_CLS
    assert config.parallel_config.worker_cls == CPU_WORKER_CLS


def test_other_methods_keep_vllm_defaults(tiny_models):
    config = _config(tiny_models["qwen2_5_vl"], **vllm_glimpse.engine_kwargs("visionzip"))
    assert config.scheduler_config.scheduler_cls != SCHEDULER_CLS
    assert config.parallel_config.worker_cls != CPU_WORKER_CLS


def test_explicit_async_scheduling_is_refused(tiny_models, qwen_checkpoint):
    with pytest.raises(Exception) as info:
        _config(tiny_models["qwen2_5_vl"], async_scheduling=True,
                **vllm_glimpse.engine_kwargs("glimpse", checkpoint=qwen_checkpoint))
    assert "GlimpsePrune needs async scheduling off" in str(info.value)


def test_missing_checkpoint_is_named(tiny_models, tmp_path):
    with pytest.raises(Exception) as info:
        _config(tiny_models["qwen2_5_vl"], **vllm_glimpse.engine_kwargs("glimpse"))
    assert "glimpse needs a GlimpsePrune checkpoint" in str(info.value)
    with pytest.raises(Exception) as info:
        _config(tiny_models["qwen2_5_vl"],
                **vllm_glimpse.engine_kwargs("glimpse", checkpoint=str(tmp_path / "nowhere")))
    assert "nowhere" in str(info.value)


def test_checkpoint_for_another_model_is_refused_at_startup(tiny_models, tmp_path):
    llava_ckpt = write_tiny_checkpoint(tmp_path / "llava", "llava",
                                       AutoConfig.from_pretrained(tiny_models["llava"]))
    with pytest.raises(Exception) as info:
        _config(tiny_models["qwen2_5_vl"],
                **vllm_glimpse.engine_kwargs("glimpse", checkpoint=str(llava_ckpt)))
    assert "llava" in str(info.value).lower()


@pytest.mark.parametrize("dest, flag", cli.GLIMPSE_CONFLICTS)
def test_cli_refuses_conflicting_flags(qwen_checkpoint, dest, flag):
    args = argparse.Namespace(vllm_glimpse_plugin="glimpse", vllm_glimpse_glimpse_checkpoint=qwen_checkpoint,
                              model=None, **{dest: True})
    with pytest.raises(cli.StartupError) as info:
        cli.engine_kwargs_from_cli(args)
    assert f"--plugin glimpse cannot run with {flag}" in str(info.value)
