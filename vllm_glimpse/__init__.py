"""vllm-glimpse: visual-token pruning (GlimpsePrune, VisionZip) for vLLM.

Offline use::

    from vllm import LLM
    import vllm_glimpse
    llm = LLM(model=..., **vllm_glimpse.engine_kwargs(method="visionzip", dominant=54, contextual=10))

This module stays import-light (no torch, no vllm): a ``.pth`` start-up hook imports it.
"""

from vllm_glimpse.settings import (
    METHODS,
    PruningConfig,
    PruningSettingsError,
    engine_kwargs,
)

__version__ = "0.1.0"
__all__ = ["METHODS", "PruningConfig", "PruningSettingsError", "engine_kwargs", "__version__"]
