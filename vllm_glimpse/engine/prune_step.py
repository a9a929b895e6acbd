"""The keep decision for every request of a step at once, and where the survivors go.

:class:`PruneBatch` is the step's plan as tensors (built on the host once, copied to the device
without waiting); :func:`decide` takes the VIP's logits of all requests' image tokens and gives
the rows that survive, with exactly one host synchronisation: the copy of the kept counts and kept
rows that the scheduler and the runner need (they size the next step). Everything before it (the
keep rule and its top-k, the per-request handling of non-finite logits, the per-image counts) is
batched tensor work with no Python loop over requests; everything after it is host arithmetic on
that copy plus one host-to-device copy of the slots.

Keep rule: :func:`vllm_glimpse.kernels.glimpse_triton.keep_and_compact` with per-request
parameters (the Triton kernels on CUDA; vectorised torch elsewhere), the authors' anchors and the
"non-finite VIP output keeps everything" guard both given as tokens it must keep.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_glimpse.engine.kv import PagedKV
from vllm_glimpse.engine.plan import GlimpseStepPlan, PruneResult
from vllm_glimpse.glimpse.config import GlimpseConfig
from vllm_glimpse.glimpse.keep_rule import ANCHOR_NAMES, KeepRule
from vllm_glimpse.glimpse.modules import glimpse_attention_scores
from vllm_glimpse.settings import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)


def _anchor_index(name: str, h: int, w: int) -> int:
    return {"tl": 0, "tr": w - 1, "bl": (h - 1) * w, "br": h * w - 1}[name]


@dataclass
class PruneBatch:
    """The requests of a step that prune, as tensors. T: their image tokens, request after
    request (each request's images in prompt order); B: requests; G: images."""

    # host (numpy) copies the decision's bookkeeping reads
    row_starts: np.ndarray  # [B] the row prompt token 0 of each request would have (its first
    # scheduled row minus its tokens computed in earlier steps: prefix-cache hits)
    num_computed: np.ndarray  # [B] prompt tokens computed before the step (all kept, in place)
    num_prompt: np.ndarray  # [B] P, glimpse token included
    image_counts: np.ndarray  # [B] image tokens per request
    images_per_request: list[int]
    block_ids: list[list[int]]
    block_size: int
    # device tensors
    glimpse_rows: torch.Tensor  # [B] long
    last_rows: torch.Tensor  # [B] long: the last real token of each prompt (always kept)
    image_rows: torch.Tensor  # [T] long: rows of the step
    image_positions: torch.Tensor  # [T] long: positions within the request's prompt
    image_slots: torch.Tensor  # [T] long: the cache slots they were written to in this step
    image_offsets: torch.Tensor  # [B+1] long
    image_request: torch.Tensor  # [T] long
    image_id: torch.Tensor  # [T] long: which of the G images
    block_table: torch.Tensor  # [B, max blocks] int32
    seq_lens: torch.Tensor  # [B] long (P)
    threshold: torch.Tensor  # [B] float32
    max_remain_ratio: torch.Tensor  # [B] float64, NaN = unset
    min_remain_num: torch.Tensor  # [B] long, 0 = unset
    fixed_remain_ratio: torch.Tensor  # [B] float64, NaN = unset
    force_keep: torch.Tensor  # [T] bool: anchors

    @property
    def num_requests(self) -> int:
        return len(self.row_starts)

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_counts.sum())

    def prompt_slots(self, b: int, device) -> torch.Tensor:
        """Slots of request b's whole prompt (positions 0..P-1: written in this step, or before
        it for tokens that came from the prefix cache)."""
        p = np.arange(int(self.num_prompt[b]))
        blocks = np.asarray(self.block_ids[b], dtype=np.int64)[p // self.block_size]
        return torch.from_numpy(blocks * self.block_size + p % self.block_size).to(device)


def _to(device, array, dtype) -> torch.Tensor:
    # non_blocking: from pageable host memory the copy is staged, nothing waits for the device
    return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype,
                                                            non_blocking=True)


def build_prune_batch(plan: GlimpseStepPlan, rules: Sequence[KeepRule], device) -> PruneBatch:
    """The plan as tensors; ``rules[b]``: request b's keep rule. A rule with anchors on a request
    of several images is refused as :func:`vllm_glimpse.glimpse.keep_rule.keep_mask` refuses it."""
    reqs = plan.requests
    bs = plan.block_size
    row_starts = np.array([r.token_row0 for r in reqs], dtype=np.int64)
    num_computed = np.array([r.num_computed for r in reqs], dtype=np.int64)
    num_prompt = np.array([r.num_prompt_tokens for r in reqs], dtype=np.int64)
    positions, requests, image_ids, force = [], [], [], []
    image_counts, per_request = [], []
    g = 0
    for b, (req, rule) in enumerate(zip(reqs, rules)):
        n = 0
        for span in req.images:
            if span.offset < req.num_computed:
                raise RuntimeError(
                    f"vllm-glimpse: request {req.req_id} has image tokens computed before the step "
                    "that prunes it; GlimpsePrune needs every image token in that step")
            positions.append(np.arange(span.offset, span.offset + span.length, dtype=np.int64))
            image_ids.append(np.full(span.length, g, dtype=np.int64))
            g += 1
            n += span.length
        requests.append(np.full(n, b, dtype=np.int64))
        image_counts.append(n)
        per_request.append(len(req.images))
        anchors = np.zeros(n, dtype=bool)
        if rule.anchor_positions:
            if len(req.images) != 1:
                raise ValueError("anchor_positions need the image grid (grid_hw) of a single-image "
                                 f"sample; request {req.req_id} has {len(req.images)} images")
            h, w = req.images[0].grid_hw
            if h * w != n:
                raise ValueError(f"anchor_positions need a single-image sample: grid {h}x{w} = "
                                 f"{h * w} tokens, but the sample has {n}")
            for name in rule.anchor_positions:
                if name not in ANCHOR_NAMES:
                    raise ValueError(f"unknown anchor position {name!r}")
                anchors[_anchor_index(name, h, w)] = True
        force.append(anchors)
    positions = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    image_request = np.concatenate(requests) if requests else np.zeros(0, np.int64)
    width = max(len(r.block_ids) for r in reqs)
    table = np.zeros((len(reqs), width), dtype=np.int32)
    for b, r in enumerate(reqs):
        table[b, :len(r.block_ids)] = r.block_ids
    blocks = table[image_request, positions // bs].astype(np.int64)
    image_slots = blocks * bs + positions % bs
    nan = float("nan")
    return PruneBatch(
        row_starts=row_starts, num_computed=num_computed, num_prompt=num_prompt,
        image_counts=np.array(image_counts),
        images_per_request=per_request, block_ids=[list(r.block_ids) for r in reqs], block_size=bs,
        glimpse_rows=_to(device, row_starts + num_prompt - 1, torch.long),
        last_rows=_to(device, row_starts + num_prompt - 2, torch.long),
        image_rows=_to(device, row_starts[image_request] + positions, torch.long),
        image_positions=_to(device, positions, torch.long),
        image_slots=_to(device, image_slots, torch.long),
        image_offsets=_to(device, np.concatenate([[0], np.cumsum(image_counts)]), torch.long),
        image_request=_to(device, image_request, torch.long),
        image_id=_to(device, np.concatenate(image_ids) if image_ids else np.zeros(0), torch.long),
        block_table=_to(device, table, torch.int32),
        seq_lens=_to(device, num_prompt, torch.long),
        threshold=_to(device, [r.threshold for r in rules], torch.float32),
        max_remain_ratio=_to(device, [nan if r.max_remain_ratio is None else r.max_remain_ratio
                                      for r in rules], torch.float64),
        min_remain_num=_to(device, [r.min_remain_num or 0 for r in rules], torch.long),
        fixed_remain_ratio=_to(device, [nan if r.fixed_remain_ratio is None else r.fixed_remain_ratio
                                        for r in rules], torch.float64),
        force_keep=_to(device, np.concatenate(force) if force else np.zeros(0, bool), torch.bool),
    )


class StepRows:
    """The rows the prune step works on after layer K: the step's own rows with, in front of a
    pruning request's first row, the rows held for it from earlier chunks of a chunked prefill
    (tokens ``first..first + count - 1``, computed through layer K in those steps). Row numbers
    of the plan's requests in this layout are what :func:`build_prune_batch` and :func:`decide`
    see; nothing changes for a step without held rows."""

    def __init__(self, num_step_rows: int, insertions: Sequence[tuple[int, int, int]],
                 device) -> None:
        """``insertions``: (step row before which, first token, count), in row order."""
        self.num_step_rows = num_step_rows
        self.insertions = [(r, f, n) for r, f, n in insertions if n > 0]
        shift = np.zeros(num_step_rows, dtype=np.int64)
        for r, _, n in self.insertions:
            shift[r:] += n
        self.ext_of_step_np = np.arange(num_step_rows, dtype=np.int64) + shift
        self.num_rows = num_step_rows + sum(n for _, _, n in self.insertions)
        self.ext_of_step = _to(device, self.ext_of_step_np, torch.long)

    def held_row_starts(self) -> list[int]:
        """The row of each insertion's first held token."""
        return [int(self.ext_of_step_np[r]) - n for r, _, n in self.insertions]

    def insert(self, step: torch.Tensor, held: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """The step's rows (along ``dim``) with ``held[i]`` in front of insertion i's row."""
        if not self.insertions:
            return step
        step = step.narrow(dim, 0, self.num_step_rows)
        pieces, prev = [], 0
        for (r, _, _), rows in zip(self.insertions, held, strict=True):
            pieces += [step.narrow(dim, prev, r - prev), rows.to(step.dtype)]
            prev = r
        pieces.append(step.narrow(dim, prev, self.num_step_rows - prev))
        return torch.cat(pieces, dim)

    def token_positions(self, step_positions: torch.Tensor) -> torch.Tensor:
        """1-D token positions in this layout, from the step's (the held rows' are their token
        indices, as for any prefill row)."""
        held = [torch.arange(f, f + n, device=step_positions.device, dtype=step_positions.dtype)
                for _, f, n in self.insertions]
        return self.insert(step_positions, held)


@dataclass
class PruneDecision:
    """Who survives, on the host (after the step's one synchronisation) and on the device."""

    keep_rows: torch.Tensor  # [num_tokens] bool, device: rows of the step that go on
    survivors: torch.Tensor  # [num_survivors] long, device
    results: list[PruneResult]  # per request, host
    nonfinite: list[bool]  # per request: the VIP gave a non-finite logit (all tokens kept)
    moved_rows: torch.Tensor  # [M] long, device: survivors of the pruning requests
    old_slots: torch.Tensor  # [M] long, device: where their K/V are now
    new_slots: torch.Tensor  # [M] long, device: where they go
    moved_survivor_index: torch.Tensor  # [M] long, device: their index among the survivors


def decide(batch: PruneBatch, vip_logits: torch.Tensor, num_tokens: int, *,
           dropped_rows: torch.Tensor | None = None, backend: str = "auto") -> PruneDecision:
    """The keep rule on every request, then the survivors and their new slots (see the module
    docstring for the one host synchronisation). ``dropped_rows``: rows of other requests that
    do not go on either (chunks held after layer K)."""
    from vllm_glimpse.kernels.glimpse_triton import keep_and_compact

    device = vip_logits.device
    B = batch.num_requests
    logits = vip_logits.reshape(-1).float()
    bad = ~torch.isfinite(logits)
    nonfinite = torch.zeros(B, dtype=torch.int32, device=device).index_add_(
        0, batch.image_request, bad.int()) > 0
    # A request with a non-finite logit keeps every image token (a broken checkpoint must not
    # take the engine down); its logits are zeroed only so that the rule's arithmetic stays finite.
    scores = torch.where(bad, torch.zeros_like(logits), logits)
    force = batch.force_keep | nonfinite[batch.image_request]
    kept = keep_and_compact(
        scores, batch.image_offsets, threshold=batch.threshold,
        max_remain_ratio=batch.max_remain_ratio, min_remain_num=batch.min_remain_num,
        fixed_remain_ratio=batch.fixed_remain_ratio, force_keep=force, trim=False, backend=backend)
    keep_rows = torch.ones(num_tokens, dtype=torch.bool, device=device)
    keep_rows[batch.image_rows] = kept.keep_mask
    keep_rows[batch.glimpse_rows] = False
    # The sampler reads the last real token's hidden state: it always stays (the authors'
    # prompts end with text; this matters only for a prompt ending in an image token).
    keep_rows[batch.last_rows] = True
    if dropped_rows is not None and dropped_rows.numel():
        keep_rows[dropped_rows] = False
    num_images = len(batch.images_per_request) and sum(batch.images_per_request)
    per_image = torch.zeros(num_images, dtype=torch.int32, device=device).index_add_(
        0, batch.image_id, keep_rows[batch.image_rows].int())
    # The step's one host synchronisation: kept rows, per-image counts, non-finite flags.
    host = torch.cat([keep_rows.int(), per_image, nonfinite.int()]).cpu().numpy()
    keep_host = host[:num_tokens].astype(bool)
    per_image_host = host[num_tokens:num_tokens + num_images].tolist()
    nonfinite_host = host[num_tokens + num_images:].astype(bool).tolist()

    survivor_index = np.cumsum(keep_host) - 1  # row -> index among survivors
    results, moved_rows, old_slots, new_slots = [], [], [], []
    g = 0
    bs = batch.block_size
    for b in range(B):  # host bookkeeping on the copied counts (no device work)
        start, P, c = int(batch.row_starts[b]), int(batch.num_prompt[b]), int(batch.num_computed[b])
        # Tokens computed in earlier steps through every layer (prefix-cache hits and earlier
        # chunks, all before the first image) stay, at their slots; the rows are tokens c..P-1.
        stepped = c + np.nonzero(keep_host[start + c:start + P - 1])[0]
        local = np.concatenate([np.arange(c, dtype=np.int64), stepped])
        n_img = batch.images_per_request[b]
        kept_per_image = per_image_host[g:g + n_img]
        g += n_img
        results.append(PruneResult(
            kept_rows=torch.from_numpy(local.astype(np.int64)), num_prompt_tokens=P,
            image_tokens_before=int(batch.image_counts[b]),
            image_tokens_after=int(sum(kept_per_image)), kept_per_image=kept_per_image))
        blocks = np.asarray(batch.block_ids[b], dtype=np.int64)
        j = np.arange(c, local.size)  # new indices of the step's survivors
        moved_rows.append(stepped + start)
        old_slots.append(blocks[stepped // bs] * bs + stepped % bs)  # token index = row - start
        new_slots.append(blocks[j // bs] * bs + j % bs)
    moved_rows = np.concatenate(moved_rows)
    survivors = np.nonzero(keep_host)[0]
    return PruneDecision(
        keep_rows=keep_rows,
        survivors=_to(device, survivors, torch.long),
        results=results, nonfinite=nonfinite_host,
        moved_rows=_to(device, moved_rows, torch.long),
        old_slots=_to(device, np.concatenate(old_slots), torch.long),
        new_slots=_to(device, np.concatenate(new_slots), torch.long),
        moved_survivor_index=_to(device, survivor_index[moved_rows], torch.long),
    )


def glimpse_layer_logits(batch: PruneBatch, queries: torch.Tensor, kv: PagedKV, *, scale: float,
                         use_attention_logits: bool,
                         recorded_keys: torch.Tensor | None = None) -> torch.Tensor:
    """One selected layer: each request's glimpse query ``queries [B, heads, D]`` against its
    image keys, float32 ``[T, heads]``; raw logits, or log-softmax over all the request's keys
    then the image columns (``use_attention_logits`` false: LLaVA).

    Plain (FlashAttention) cache: the fused kernel reads the keys from the paged cache for the
    whole batch in one launch (``kernels/glimpse_triton.py``, with ``scale``). Otherwise each
    request's keys are read back from the cache (or taken from ``recorded_keys [rows, kv_heads,
    D]``, the step's keys, when the cache cannot be read) and scored by
    :func:`glimpse_attention_scores` (scale 1/sqrt(D), the authors'), a request at a time."""
    if kv.views is not None:
        from vllm_glimpse.kernels.glimpse_triton import glimpse_attention_logits

        return glimpse_attention_logits(
            queries, kv.views[0], batch.block_table, batch.image_positions, batch.image_offsets,
            scale, seq_lens=None if use_attention_logits else batch.seq_lens)
    device = queries.device
    offsets = batch.image_offsets.tolist()
    scores = []
    for b in range(batch.num_requests):
        image = slice(offsets[b], offsets[b + 1])
        if use_attention_logits:  # raw logits: only the image keys are needed
            keys = (kv.read_keys(batch.image_slots[image]) if recorded_keys is None
                    else recorded_keys[batch.image_rows[image]])
            index = torch.arange(keys.shape[0], device=device)
        else:
            if recorded_keys is None:
                keys = kv.read_keys(batch.prompt_slots(b, device))
            else:
                if batch.num_computed[b]:
                    raise RuntimeError(
                        "vllm-glimpse: this KV cache cannot be read back and the request's first "
                        f"{int(batch.num_computed[b])} prompt tokens came from the prefix cache: "
                        "LLaVA's glimpse scores need their keys; start the engine with "
                        "--no-enable-prefix-caching")
                start = int(batch.row_starts[b])
                keys = recorded_keys[start:start + int(batch.num_prompt[b])]
            index = batch.image_positions[image]
        scores.append(glimpse_attention_scores(queries[b].float(), keys.float(), index,
                                               use_attention_logits=use_attention_logits))
    return torch.cat(scores)


def prune_step_peak_bytes(num_tokens: int, cfg: GlimpseConfig, *, num_kv_heads: int,
                          head_size: int, elem_size: int, kv_recorded: bool,
                          row_chunk: int | None = None) -> int:
    """An upper bound of the bytes the prune step allocates for a step of ``num_tokens`` tokens,
    all of them image tokens of pruning requests (the worst case), summed over its phases (which
    do not all live at once): the keys read back for scoring (and their float32 copy), the
    glimpse logits (float32, and a copy in the VIP's dtype), the VIP's activations, the keep
    rule's per-token tensors (float32 and int64, a dozen), and one layer's survivors' K/V read
    back for the move. ``kv_recorded``: the cache cannot be read back, so K and V of layers 0..K
    are held instead.

    The VIP (:class:`~vllm_glimpse.glimpse.modules.ConditionalSelfAttention`, one head at a time)
    holds per token its hidden state, the block's normalised input, attention output and next
    hidden state, one vision feature map (cast) and its projection, the RoPE angles' cos / sin,
    and one head's q / k / v / attention output; its row-wise temporaries (q/k input, float32
    RoPE and norm, the MLP's three tensors) live for ``row_chunk`` rows at a time (the CPU's
    :data:`VIP_CHUNK_ROWS`; None: all rows, as on CUDA)."""
    T, e = num_tokens, elem_size
    rows = T if row_chunk is None else min(T, row_chunk)
    fuse, cond = cfg.attn_fuse_size, cfg.visual_cond_size
    qk = fuse + cond
    d = qk // cfg.attn_fuse_num_heads
    logits = T * len(cfg.selected_layers) * cfg.num_attention_heads * (4 + e)
    keys = T * num_kv_heads * head_size * (e + 4)  # keys read back for scoring, and in float32
    vip_held = T * (e * (4 * fuse + cfg.vision_hidden_size + cond + d + 4 * d))
    vip_rows = rows * (e * (qk + 3 * 2 * fuse) + 4 * (5 * d + 3 * fuse))
    keep = T * (4 * 3 + 8 * 12)
    move = T * 2 * num_kv_heads * head_size * e
    held = T * (cfg.reduce_layer + 1) * 2 * num_kv_heads * head_size * e if kv_recorded else 0
    return logits + keys + vip_held + vip_rows + keep + move + held
