"""vLLM general plugin (entry point ``glimpse`` in group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (front end, engine core, workers, the
registry's inspection subprocess) before it resolves a model, so our variants are known
everywhere. Registration is by "module:Class" string: nothing heavy is imported here.
"""

from __future__ import annotations

from vllm_glimpse.settings import VARIANTS


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for variant in VARIANTS.values():
        if variant.arch not in supported:
            ModelRegistry.register_model(variant.arch, variant.qualname)
