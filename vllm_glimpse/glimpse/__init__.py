"""GlimpsePrune (arXiv 2508.01548) building blocks, independent of vLLM.

* :mod:`.config`: :class:`GlimpseConfig`, the resolved settings of one checkpoint on one model.
* :mod:`.modules`: :class:`GlimpsePredictor` = the glimpse token + the VIP (``attn_fuser``),
  named and shaped as the authors' ``new_modules_gp.pt``; :func:`glimpse_attention_scores`.
* :mod:`.checkpoint`: :func:`load_glimpse_checkpoint` (local directory or HF hub id).
* :mod:`.keep_rule`: :func:`keep_mask` / :class:`KeepRule`.

How the pieces are used at inference (authors' transformers_gp/models/qwen2_5_vl/model_gp.py
``_glimpse_forward``, ``_append_le``, ``_try_add_le``; llava_gp/.../llava_llama.py likewise):

1. The glimpse token (``predictor.glimpse_embedding(0)``) is appended after the last prompt
   token; Qwen gives it position ``position_ids[-1, b, -1] + 1`` (the last token's third M-RoPE
   component plus one) on all three axes, LLaVA the next 1-D position.
2. Before each layer l > 0 in ``le_layers``, ``glimpse_embedding(l)`` is added to the glimpse
   token's hidden state.
3. At each of ``selected_layers`` the glimpse token's query against every image token's key
   (post-RoPE, :func:`glimpse_attention_scores`) gives ``[N_img, heads]``; the layers are
   concatenated head-wise in ``selected_layers`` order.
4. The VIP (``predictor(attn_logits, vision_feats, grid_hw)``) turns them, with the vision
   features of ``selected_visual_layers``, into one logit per image token.
5. ``config.keep_rule`` picks the survivors per sample over all its image tokens; after layer
   ``reduce_layer`` (K) the pruned image tokens and the glimpse token leave the sequence and the
   KV cache of layers 0..K.
"""

from vllm_glimpse.glimpse.checkpoint import (
    CONFIG_NAME,
    HUB_IDS,
    WEIGHTS_NAME,
    GlimpseCheckpoint,
    expected_shapes,
    load_glimpse_checkpoint,
    parse_glimpse_config,
    read_checkpoint_tensors,
    read_glimpse_config,
    request_keep_rule,
    resolve_checkpoint_dir,
)
from vllm_glimpse.glimpse.config import LLAVA, QWEN, GlimpseConfig
from vllm_glimpse.glimpse.keep_rule import KeepRule, keep_mask
from vllm_glimpse.glimpse.modules import (
    GlimpsePredictor,
    VisualImportancePredictor,
    glimpse_attention_scores,
    grid_positions,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "HUB_IDS",
    "LLAVA",
    "QWEN",
    "GlimpseCheckpoint",
    "GlimpseConfig",
    "GlimpsePredictor",
    "KeepRule",
    "VisualImportancePredictor",
    "expected_shapes",
    "glimpse_attention_scores",
    "grid_positions",
    "keep_mask",
    "load_glimpse_checkpoint",
    "parse_glimpse_config",
    "read_checkpoint_tensors",
    "read_glimpse_config",
    "request_keep_rule",
    "resolve_checkpoint_dir",
]
