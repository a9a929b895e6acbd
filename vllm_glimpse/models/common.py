"""Pieces shared by our model variants."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vllm_glimpse.kernels.visionzip_triton import attention_received_scores
from vllm_glimpse.parallel import sum_over_head_shards
from vllm_glimpse.settings import (
    GLIMPSE_REQUEST_KNOBS,
    GlimpseSettings,
    PruningConfig,
    pruning_config_of,
    request_config,
    request_glimpse_overrides,
    split_request_knobs,
    visionzip_budget,
)
from vllm_glimpse.stats import TOKENS_BEFORE_FIELD

# A GlimpsePrune request's own keep-rule knobs, as a processor output field: [num_images, 4]
# (threshold, max_ratio, min_keep, fixed_ratio; NaN = not set by the request). Read by the
# runner when it plans the step that prunes the request (``keep_overrides_of``).
KEEP_RULE_FIELD = "vllm_glimpse_keep_rule"

# The per-image pruning budget a request runs with, as a processor output field: [num_images, 2]
# (LLaVA: dominant, contextual counts; Qwen2.5-VL: dominant, contextual ratios).
BUDGET_FIELD = "vllm_glimpse_budget"


class PruningHashMixin:
    """Salt multimodal hashes with the pruning settings.

    vLLM keys its processor cache and encoder cache by the item's hash, which covers the image and
    the request's processor kwargs but not ``hf_overrides`` (docs/design.md §3). Without the salt an
    engine could hand out embeddings computed under other pruning settings (or none) for the
    same image. Method ``none`` leaves hashes as vLLM computes them.
    """

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        config = pruning_config_of(self.info.get_hf_config())
        if config.method == "none":
            return hashes
        salt = json.dumps(config.to_dict(), sort_keys=True)
        return {
            modality: [hashlib.sha256(f"{h}|vllm_glimpse={salt}".encode()).hexdigest() for h in hs]
            for modality, hs in hashes.items()
        }


class GlimpseTokenMixin:
    """GlimpsePrune: append the glimpse token after the last prompt token of every request that
    has images (authors' ``_append_le``). It is an ordinary prompt token to vLLM (the scheduler
    counts it, the prompt gets a position for it: last + 1, on all three M-RoPE axes for Qwen);
    the model replaces its embedding with the learned one and drops it after layer K. Its id is
    the tokenizer's pad token (else EOS): any id works, the embedding is never looked up.
    The front end drops it from the prompt ids the caller sees (``stats._drop_glimpse_token``)."""

    def apply(self, *args, **kwargs):
        result = super().apply(*args, **kwargs)
        if pruning_config_of(self.info.get_hf_config()).method != "glimpse":
            return result
        if not result.get("mm_placeholders", {}).get("image"):
            return result
        tokenizer = self.info.get_tokenizer()
        token = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        result["prompt_token_ids"] = list(result["prompt_token_ids"]) + [int(token)]
        return result


class RequestBudgetMixin:
    """Per-request pruning settings in ``mm_processor_kwargs`` (``visionzip_dominant``, ...).

    The request's keys are validated against the model like the engine's settings
    (``settings.request_config``), kept away from the HF processor, and each image of the
    request carries the budget it runs with to the prompt updates and the model in the
    ``vllm_glimpse_budget`` field. vLLM hashes a request's processor kwargs with its items, so
    a per-request budget is part of the multimodal hash. Subclasses define
    ``_image_budget(config)`` (the pair an image gets, None when not pruning) and
    ``_num_images(processed)`` (images in a processor output).
    """

    def _request_config(self, hf_kwargs: Mapping[str, object]) -> PruningConfig:
        return request_config(self.info.get_hf_config(), hf_kwargs)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        _, hf_only = split_request_knobs(hf_kwargs)
        return super()._call_hf_processor(hf_data, hf_only)

    def _postprocess_hf_mm_data(self, hf_data, hf_kwargs, processed):
        processed = super()._postprocess_hf_mm_data(hf_data, hf_kwargs, processed)
        config = self._request_config(hf_kwargs)
        num_images = self._num_images(processed)
        if not num_images:
            return processed
        budget = self._image_budget(config)
        if budget is not None:
            processed[BUDGET_FIELD] = torch.tensor([budget] * num_images, dtype=torch.float64)
            # for the request's stats (vllm_glimpse.stats): what each image takes unpruned
            processed[TOKENS_BEFORE_FIELD] = torch.tensor(self._unpruned_tokens(processed),
                                                          dtype=torch.int64)
        overrides = request_glimpse_overrides(hf_kwargs) if config.method == "glimpse" else None
        if overrides is not None:
            row = [math.nan if getattr(overrides, k) is None else float(getattr(overrides, k))
                   for k in GLIMPSE_REQUEST_KNOBS]
            processed[KEEP_RULE_FIELD] = torch.tensor([row] * num_images, dtype=torch.float64)
        return processed

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for name in (BUDGET_FIELD, KEEP_RULE_FIELD, TOKENS_BEFORE_FIELD):
            if name in hf_inputs:
                fields[name] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields


class LlavaRequestBudgetMixin(RequestBudgetMixin):
    """Per-request VisionZip counts for the LLaVA processors: each image's placeholder count
    follows the budget it carries (``info.visionzip_num_tokens``)."""

    def _image_budget(self, config: PruningConfig) -> tuple[float, float] | None:
        budget = visionzip_budget(self.info.get_hf_config(), config)
        return None if budget is None else (float(budget[0]), float(budget[1]))

    def _num_images(self, processed) -> int:
        pixel_values = processed.get("pixel_values")
        return 0 if pixel_values is None else len(pixel_values)

    def _unpruned_tokens(self, processed) -> list[int]:
        sizes = processed.get("image_sizes")  # LLaVA-NeXT: each image's (height, width)
        if sizes is None:  # LLaVA-1.5: the same count for any image
            sizes = [tuple(p.shape[-2:]) for p in processed["pixel_values"]]
        return [self.info.unpruned_num_tokens(int(w), int(h)) for h, w in
                (s.tolist() if isinstance(s, torch.Tensor) else s for s in sizes)]

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)

        def with_budget(update):
            original = update.replacement

            def replacement(item_idx: int):
                budget = item_budget(out_mm_kwargs, item_idx)
                if budget is None:  # image embeddings: vLLM's count
                    return original(item_idx)
                size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
                count = self.info.visionzip_num_tokens(
                    size.width, size.height, (int(budget[0]), int(budget[1])))
                return [update.target[0]] * count

            return PromptReplacement(modality="image", target=update.target, replacement=replacement)

        return [with_budget(u) if u.modality == "image" else u for u in updates]


class RequestBudgetModelMixin:
    """For the LLaVA models: the per-image budgets of the ``embed_multimodal`` call in progress
    (``self._request_budgets``; None outside one, or without per-request settings)."""

    _request_budgets = None

    def embed_multimodal(self, **kwargs: object):
        self._request_budgets = image_budgets(kwargs)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._request_budgets = None


def item_budget(out_mm_kwargs, item_idx: int) -> tuple[float, float] | None:
    """The budget the processor attached to image ``item_idx`` (None without one)."""
    item = out_mm_kwargs["image"][item_idx]
    if BUDGET_FIELD not in item:
        return None
    dominant, contextual = item[BUDGET_FIELD].data.tolist()
    return dominant, contextual


def keep_overrides_of(mm_feature) -> GlimpseSettings | None:
    """The keep-rule knobs the request of this image set itself (None: the engine's rule)."""
    data = mm_feature.data
    if data is None or KEEP_RULE_FIELD not in data:
        return None
    values = data[KEEP_RULE_FIELD].data.tolist()
    knobs = {k: v for k, v in zip(GLIMPSE_REQUEST_KNOBS, values) if not math.isnan(v)}
    if "min_keep" in knobs:
        knobs["min_keep"] = int(knobs["min_keep"])
    return GlimpseSettings(**knobs)


def image_budgets(kwargs: dict) -> list[tuple[float, float]] | None:
    """Pop the per-image budgets from the kwargs vLLM hands ``embed_multimodal`` (and our other
    processor fields, which the runner and the scheduler read, not the model)."""
    kwargs.pop(KEEP_RULE_FIELD, None)
    kwargs.pop(TOKENS_BEFORE_FIELD, None)
    budgets = kwargs.pop(BUDGET_FIELD, None)
    if budgets is None:
        return None
    return [tuple(b.tolist()) for b in budgets]


def clip_tower_with_visionzip_inputs(
    vision_tower, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run vLLM's CLIP tower (built up to LLaVA's feature layer -2) and collect what VisionZip
    reads from that last layer: its output hidden states [B, S, E] (CLS first), the CLS query's
    softmax attention over all S keys summed over heads [B, S], and the head-mean keys
    [B, S, head_dim] (pre-scale ``k_proj`` output, as the authors' ``CLIPAttention_forward``
    returns ``raw_key_states.mean(1)``).

    vLLM's CLIP attention returns no probabilities, so the CLS row is recomputed from the
    layer's own ``qkv_proj`` output: one [heads, S] row per image, cheap next to the layer.
    """
    vision_model = vision_tower.vision_model
    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values.to(vision_tower.dtype)))
    *earlier, last = vision_model.encoder.layers
    for layer in earlier:
        hidden = layer(hidden)
    attn = last.self_attn
    qkv, _ = attn.qkv_proj(last.layer_norm1(hidden))
    query, key, _ = qkv.chunk(3, dim=-1)
    batch, seq, _ = key.shape
    heads, head_dim = attn.num_heads_per_partition, attn.head_dim
    key = key.reshape(batch, seq, heads, head_dim)
    cls_query = query[:, :1].reshape(batch, 1, heads, head_dim)
    # The authors sum the CLS row of the softmax attention over heads.
    cls_scores = torch.stack([
        attention_received_scores(cls_query[i], key[i], attn.scale, reduce="sum")
        for i in range(batch)
    ])
    if heads == attn.num_heads:
        return last(hidden), cls_scores, key.mean(dim=2)
    # Tensor parallel: this rank holds `heads` of the layer's heads; both need all of them.
    cls_scores, key_sum = sum_over_head_shards([cls_scores, key.sum(dim=2)], heads_split=True)
    return last(hidden), cls_scores, key_sum / attn.num_heads
