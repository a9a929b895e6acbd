"""The engine settings GlimpsePrune needs are applied when it is on, and conflicts are named.

Built with ``EngineArgs.create_engine_config`` (no engine starts)."""

from __future__ import annotations

import argparse
import logging
import re

import pytest
from transformers import AutoConfig
from vllm.engine.arg_utils import EngineArgs

import vllm_glimpse
from vllm_glimpse import cli
from vllm_glimpse.engine.engine_config import CPU_WORKER_CLS, SCHEDULER_CLS
from vllm_glimpse.testing.glimpse_checkpoints import write_tiny_checkpoint


@pytest.fixture(scope="module")
def qwen_checkpoint(glimpse_checkpoints):
    return glimpse_checkpoints["qwen2_5_vl"]


def _config(model, **kwargs):
    return EngineArgs(model=str(model), **kwargs).create_engine_config()


def test_glimpse_turns_on_what_it_needs(tiny_models, qwen_checkpoint):
    config = _config(tiny_models["qwen2_5_vl"], max_model_len=4096,
                     **vllm_glimpse.engine_kwargs("glimpse", checkpoint=qwen_checkpoint))
    vanilla = _config(tiny_models["qwen2_5_vl"], max_model_len=4096)
    assert config.cache_config.enable_prefix_caching is True  # vLLM's default
    # chunked prefill and the step budget as vLLM sets them
    assert config.scheduler_config.enable_chunked_prefill is True
    assert (config.scheduler_config.max_num_batched_tokens
            == vanilla.scheduler_config.max_num_batched_tokens < 4096)
    assert (config.scheduler_config.long_prefill_token_threshold
            == vanilla.scheduler_config.long_prefill_token_threshold)
    assert config.scheduler_config.async_scheduling is False
    # compiled as vLLM compiles by default: only the prune step runs outside the compiled model
    assert config.model_config.enforce_eager is False
    assert config.compilation_config.mode == vanilla.compilation_config.mode
    assert config.compilation_config.cudagraph_mode == vanilla.compilation_config.cudagraph_mode
    assert config.scheduler_config.scheduler_cls == SCHEDULER_CLS
    assert config.parallel_config.worker_cls == CPU_WORKER_CLS


@pytest.mark.parametrize("setting, env, message", [
    ({"compilation_config": {"cudagraph_mode": "FULL"}}, {},
     "GlimpsePrune does not support cudagraph_mode=FULL: a full CUDA graph of a prefill step "
     "would replay the unpruned forward"),
    ({}, {"VLLM_USE_BREAKABLE_CUDAGRAPH": "1"},
     "GlimpsePrune does not support breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1)"),
])
def test_cuda_graph_modes_that_would_skip_the_prune_are_refused(tiny_models, qwen_checkpoint,
                                                                monkeypatch, setting, env, message):
    """Refused at start-up in one line: CUDA-graph settings under which a prefill step would
    replay a captured forward (which never prunes). vLLM's own modes that keep prefills out of
    full graphs start."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kwargs = vllm_glimpse.engine_kwargs("glimpse", checkpoint=qwen_checkpoint)
    with pytest.raises(Exception, match=re.escape(message)):
        _config(tiny_models["qwen2_5_vl"], max_model_len=4096, **kwargs, **setting)
    for name in env:
        monkeypatch.delenv(name)
    for mode in ("FULL_AND_PIECEWISE", "PIECEWISE", "FULL_DECODE_ONLY"):
        _config(tiny_models["qwen2_5_vl"], max_model_len=4096, **kwargs,
                compilation_config={"cudagraph_mode": mode})


@pytest.mark.parametrize("given", [None, 1024, 6000])
def test_step_budget_is_vllms(tiny_models, qwen_checkpoint, given):
    """max_num_batched_tokens and chunked prefill of a GlimpsePrune engine are vanilla vLLM's from
    the same arguments, also with chunked prefill turned off (where vLLM itself refuses a budget
    below max_model_len)."""
    extra = {} if given is None else {"max_num_batched_tokens": given}
    kwargs = vllm_glimpse.engine_kwargs("glimpse", checkpoint=qwen_checkpoint)
    for chunked in (True, False):
        if not chunked and given == 1024:
            with pytest.raises(Exception, match="smaller than max_model_len"):
                _config(tiny_models["qwen2_5_vl"], max_model_len=4096, **extra,
                        enable_chunked_prefill=False, **kwargs)
            continue
        config = _config(tiny_models["qwen2_5_vl"], max_model_len=4096, **extra,
                         enable_chunked_prefill=chunked, **kwargs)
        vanilla = _config(tiny_models["qwen2_5_vl"], max_model_len=4096, **extra,
                          enable_chunked_prefill=chunked)
        ours, theirs = config.scheduler_config, vanilla.scheduler_config
        assert ours.enable_chunked_prefill is chunked
        assert ours.max_num_batched_tokens == theirs.max_num_batched_tokens
        assert ours.max_num_encoder_input_tokens == theirs.max_num_encoder_input_tokens
        assert ours.encoder_cache_size == theirs.encoder_cache_size


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


def test_llava_with_a_quantized_kv_cache_turns_prefix_caching_off(tiny_models, glimpse_checkpoints,
                                                                  caplog):
    """LLaVA's glimpse scores read every key of the request back from the paged cache, which a
    quantized cache does not allow: prefix caching and chunked prefill (whose earlier tokens'
    keys the prune step would have to read) go off with one line each, the step budget then
    covering a whole prompt; Qwen2.5-VL (scores over the image keys, held from earlier chunks
    where the cache cannot be read) keeps both."""
    from vllm_glimpse.settings import LOGGER_NAME

    kwargs = vllm_glimpse.engine_kwargs("glimpse", checkpoint=glimpse_checkpoints["llava"])
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        config = _config(tiny_models["llava"], kv_cache_dtype="fp8", **kwargs)
    assert config.cache_config.enable_prefix_caching is False
    assert any("GlimpsePrune on LLaVA with kv_cache_dtype=fp8 turns prefix caching off"
               in r.getMessage() for r in caplog.records)
    sched = config.scheduler_config
    assert sched.enable_chunked_prefill is False
    assert sched.max_num_batched_tokens >= config.model_config.max_model_len
    assert sched.max_num_encoder_input_tokens >= config.model_config.max_model_len
    assert any("GlimpsePrune sets enable_chunked_prefill=False (was True): LLaVA's glimpse scores "
               "read every key of the request, which kv_cache_dtype=fp8 cannot give back"
               in r.getMessage() for r in caplog.records)
    assert _config(tiny_models["llava"], **kwargs).cache_config.enable_prefix_caching is True
    qwen = vllm_glimpse.engine_kwargs("glimpse", checkpoint=glimpse_checkpoints["qwen2_5_vl"])
    config = _config(tiny_models["qwen2_5_vl"], kv_cache_dtype="fp8", **qwen)
    assert config.cache_config.enable_prefix_caching is True
    assert config.scheduler_config.enable_chunked_prefill is True
