"""Shared fixtures. Engines run inside the test process (no engine-core or worker process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` here and the ``uni`` executor in ``TINY_ENGINE_ARGS``), which
starts one in seconds instead of a minute on 2 cores; each test stops its engines before the
next starts. ``vllm serve`` tests run the server as users do, in its own processes."""

import os

# Before vllm is imported anywhere in this process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402

from vllm_glimpse.testing.tiny_models import tiny_model_path  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models():
    """name -> checkpoint dir, generated once (and cached on disk across runs)."""
    return {name: str(tiny_model_path(name)) for name in ("qwen2_5_vl", "llava", "llava_next")}


@pytest.fixture(scope="session")
def glimpse_checkpoints(tiny_models, tmp_path_factory):
    """family -> a synthetic GlimpsePrune checkpoint for the tiny model (the authors' file layout
    and key names, random weights), written once. Tests must not modify these files."""
    from transformers import AutoConfig

    from vllm_glimpse.testing.glimpse_checkpoints import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("glimpse_checkpoints")
    return {family: str(write_tiny_checkpoint(root / family, family,
                                              AutoConfig.from_pretrained(tiny_models[family])))
            for family in ("qwen2_5_vl", "llava")}


@pytest.fixture(scope="session")
def hf_glimpse(tiny_models, glimpse_checkpoints):
    """family -> the GlimpsePrune HF reference on the tiny model and its checkpoint."""
    from tests.reference.glimpse_hf import GlimpseReference

    return {family: GlimpseReference.load(family, tiny_models[family], checkpoint)
            for family, checkpoint in glimpse_checkpoints.items()}
