"""Shared fixtures. Engines are expensive on this CPU (tens of seconds each): tests share them
per module, and every module stops its engines before the next one starts."""

import os

# Before vllm is imported anywhere in this process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from vllm_glimpse.testing.tiny_models import tiny_model_path  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models():
    """name -> checkpoint dir, generated once (and cached on disk across runs)."""
    return {name: str(tiny_model_path(name)) for name in ("qwen2_5_vl", "llava", "llava_next")}
