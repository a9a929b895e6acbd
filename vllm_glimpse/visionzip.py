"""VisionZip (arXiv 2412.04467): where the keep decision is made, for every model.

Given, per image, the vision tokens' hidden states, an importance score per token and the keys
used for similarity, keep the ``dominant`` highest-scoring tokens in their original order and
merge the rest into ``contextual`` tokens. This follows the authors' code
(github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``):

- dominant: top-k of the score; ties broken towards the lower index (``torch.topk`` order is
  not specified for ties, so we sort by (score desc, index asc) to make it deterministic);
  kept tokens stay in raster order;
- contextual, from the R remaining tokens in raster order: L2-normalised keys, targets at a
  uniform stride ``step = max(1, R // C)`` (the first C of ``range(0, R, step)``), each other
  token assigned to its most similar target (cosine; first target on ties, like argmax), merged
  token = target hidden + mean of its members' hiddens (a target with no members stays as is).

Order of the kept tokens, which the LLM sees (its attention is causal, so the order changes the
answer even at identical positions); the two orders are the authors' own, per model family:

- ``"dominant_first"`` (LLaVA-1.5 / NeXT): the dominant tokens in raster order, then the
  contextual ones in target order, as their ``CLIPVisionTower_VisionZip.forward`` concatenates
  them;
- ``"raster"`` (Qwen2.5-VL, and the Qwen2-VL / Qwen3-VL family): every contextual token in its
  target's own slot, the image's kept slots in raster order, as their
  ``Qwen2_5_VL/qwen2_5vl_visionzip.py`` (``Qwen2_5_VLForConditionalGeneration.forward``) writes
  each contextual token over its target's embedding and then compacts the sequence with the
  keep mask. :func:`place_in_raster_order` does this for any caller.

The model-specific parts (which layer's attention gives the score, CLS handling, positions)
live in the model files; this module only sees tensors.

Backends: on CUDA tensors, when triton is importable, :func:`topk_indices` and
:func:`merge_contextual` run the Triton kernels of ``vllm_glimpse.kernels.visionzip_triton``
(same results, no host sync); elsewhere the torch code below, with the C++ op from ``csrc/`` for
the segment mean on CPU. :func:`use_backend` forces one (tests).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_KERNELS = "vllm_glimpse.kernels.visionzip_triton"
_BACKEND = "auto"  # "auto" | "triton" | "torch"; see use_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the backend of topk_indices / merge_contextual inside the block: "triton" (the
    kernels, on any device: CPU tensors need the kernels module imported under
    TRITON_INTERPRET=1), "torch" (the code in this module) or "auto" (triton on CUDA)."""
    global _BACKEND
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {name!r}")
    previous, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = previous


def _kernels():
    # Imported on first use: CPU serving never loads triton through this module. import_module
    # (not ``from ... import``) so that the module in sys.modules is the one used.
    return importlib.import_module(_KERNELS)


def _use_triton(tensor: torch.Tensor) -> bool:
    if _BACKEND != "auto":
        return _BACKEND == "triton"
    if tensor.device.type != "cuda":
        return False
    try:
        return _kernels().HAS_TRITON
    except ImportError:
        return False


ORDERS = ("dominant_first", "raster")


@dataclass(frozen=True)
class VisionZipResult:
    tokens: torch.Tensor  # [D + C, H] in the requested order (see the module docstring)
    slots: torch.Tensor  # [D + C] the original index (slot) of each row of ``tokens``
    dominant_index: torch.Tensor  # [D] sorted original indices of the dominant tokens
    target_index: torch.Tensor  # [C] sorted original indices of the contextual targets
    assignment: torch.Tensor  # [R - C] for each merged (non-target) remaining token: its target


def place_in_raster_order(
    tokens: torch.Tensor, dominant_index: torch.Tensor, target_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's kept tokens in the Qwen order: raster order of their slots, each contextual
    token in its target's slot.

    The authors' Qwen2.5-VL code (``Qwen2_5_VL/qwen2_5vl_visionzip.py``,
    ``Qwen2_5_VLForConditionalGeneration.forward``) marks the dominant slots and the contextual
    targets' slots in a keep mask, writes each merged contextual token over its target's
    embedding (``inputs_embeds[:, contexual_input_idx] = contextual_tokens``) and compacts the
    image with that mask (``inputs_embeds[:, img_mask]``): what is left is every kept slot in
    ascending order. Sorting the slots gives the same sequence without building the
    full-length sequence, and without a host sync on GPU.

    tokens [D + C, H]: the D dominant tokens (row i is slot ``dominant_index[i]``), then the C
    contextual tokens (row D + j is slot ``target_index[j]``); the D + C slots are distinct
    indices into the image's unpruned tokens. Returns (tokens [D + C, H] in ascending slot
    order, their slots [D + C] ascending).
    """
    slots = torch.cat([dominant_index, target_index])
    if tokens.shape[0] != slots.shape[0]:
        raise ValueError(f"{tokens.shape[0]} tokens for {slots.shape[0]} slots "
                         f"({dominant_index.shape[0]} dominant + {target_index.shape[0]} targets)")
    order = torch.argsort(slots, stable=True)
    return tokens[order], slots[order]


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties towards the lower index, returned sorted."""
    if _use_triton(scores):
        return _kernels().topk_indices(scores, k, backend="triton")
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n, device=scores.device)
    # Stable descending sort gives equal scores in index order.
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def contextual_targets(num_remaining: int, contextual: int, device=None) -> torch.Tensor:
    """Positions (within the remaining tokens) of the contextual targets: uniform stride."""
    if contextual == 0 or num_remaining == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    step = max(1, num_remaining // contextual)
    return torch.arange(0, num_remaining, step, device=device)[:contextual]


def merge_contextual(
    hidden: torch.Tensor, keys: torch.Tensor, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge R tokens into C contextual tokens.

    hidden [R, H], keys [R, Dk] (not yet normalised). Returns (merged [C, H], target positions
    [C] within the R tokens, assignment [R - C] target slot 0..C-1 of each non-target token).
    """
    if _use_triton(hidden):
        return _kernels().contextual_merge(hidden, keys, contextual, backend="triton")
    num_remaining = hidden.shape[0]
    targets = contextual_targets(num_remaining, contextual, hidden.device)
    if targets.numel() == 0:
        return hidden.new_zeros(0, hidden.shape[1]), targets, targets
    is_target = torch.zeros(num_remaining, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    normed = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    similarity = normed[~is_target] @ normed[targets].T  # [R - C, C]
    assignment = similarity.argmax(dim=-1)
    merged = segment_mean_merge(hidden[targets], hidden[~is_target], assignment)
    return merged, targets, assignment


def segment_mean_merge_reference(
    targets: torch.Tensor, members: torch.Tensor, assignment: torch.Tensor
) -> torch.Tensor:
    """targets [C, H] + per-target mean of members [M, H] assigned by assignment [M] (torch)."""
    sums = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    sums.index_add_(0, assignment, members.float())
    counts = torch.bincount(assignment, minlength=targets.shape[0]).clamp(min=1)
    return (targets.float() + sums / counts[:, None].float()).to(targets.dtype)


def segment_mean_merge(
    targets: torch.Tensor, members: torch.Tensor, assignment: torch.Tensor
) -> torch.Tensor:
    """The contextual merge: the C++ op from csrc/ on CPU where it builds, else torch."""
    if targets.device.type == "cpu":
        from vllm_glimpse.cpu_ops import cpu_ops

        ops = cpu_ops()
        if ops is not None:
            return ops.contextual_merge(members, assignment, targets)
    return segment_mean_merge_reference(targets, members, assignment)


def visionzip(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    always_keep: torch.Tensor | None = None,
    order: str = "dominant_first",
) -> VisionZipResult:
    """VisionZip for one image.

    hidden [N, H], scores [N], keys [N, Dk]. ``always_keep`` (indices) are counted in
    ``dominant`` and kept regardless of score: LLaVA's CLS token, which VisionZip always keeps.
    ``order``: ``"dominant_first"`` (LLaVA) or ``"raster"`` (Qwen), see the module docstring.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    n = hidden.shape[0]
    if dominant + contextual > n:
        raise ValueError(f"VisionZip budget {dominant}+{contextual} exceeds the {n} tokens")
    scores = scores.float()
    if always_keep is not None and always_keep.numel():
        scores = scores.clone()
        scores[always_keep] = float("inf")
    dominant_index = topk_indices(scores, dominant)
    is_dominant = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    is_dominant[dominant_index] = True
    remaining = torch.nonzero(~is_dominant).squeeze(-1)
    merged, targets, assignment = merge_contextual(hidden[remaining], keys[remaining], contextual)
    target_index = remaining[targets]
    tokens = torch.cat([hidden[dominant_index], merged], dim=0)
    if order == "raster":
        tokens, slots = place_in_raster_order(tokens, dominant_index, target_index)
    else:
        slots = torch.cat([dominant_index, target_index])
    return VisionZipResult(tokens, slots, dominant_index, target_index, assignment)
