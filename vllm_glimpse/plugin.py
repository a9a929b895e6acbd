"""vLLM general plugin (entry point ``glimpse`` in group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (front end, engine core, workers, the
registry's inspection subprocess) before it resolves a model, so our variants are known
everywhere. Registration is by "module:Class" string, and the runner patch waits for vLLM to
import the runner: nothing heavy is imported here.
"""

from __future__ import annotations

from vllm_glimpse.settings import VARIANTS


def register() -> None:
    from vllm import ModelRegistry

    from vllm_glimpse.patches import (
        add_plugin_cli_flags,
        apply_glimpse_engine_settings_per_architecture,
        enable_mrope_recompute_for_pruned_images,
        report_pruning_stats_in_front_end,
    )

    supported = set(ModelRegistry.get_supported_archs())
    for variant in VARIANTS.values():
        if variant.arch not in supported:
            ModelRegistry.register_model(variant.arch, variant.qualname)
    enable_mrope_recompute_for_pruned_images()
    add_plugin_cli_flags()
    apply_glimpse_engine_settings_per_architecture()
    report_pruning_stats_in_front_end()
