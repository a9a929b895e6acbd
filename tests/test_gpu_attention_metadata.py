"""The attention metadata GlimpsePrune rebuilds mid-forward for layers K+1.., checked with vLLM's
FlashAttention metadata builder (the GPU backend's class constructs on the CPU), on both runners.

For a batch in which requests were pruned (or, with chunked prefill, a chunk's rows held after
layer K, or rows held from earlier chunks joining the step's survivors), the V1 runner's
``GlimpseRunnerMixin._switch_attention`` derives the short batch from the runner's state, and
Model Runner V2's ``GlimpseModelState._switch_attention`` from the step's ``InputBatch`` (through
vLLM's own ``prepare_attn``); the metadata each installs must equal what the builder gives for the
same batch described directly with the requests' new (query, sequence) lengths."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.forward_context import override_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.utils import AttentionGroup

from vllm_glimpse.engine.model_states import GlimpseModelState
from vllm_glimpse.engine.runner import GlimpseRunnerMixin

BLOCK = 16
LAYERS = ["model.layers.2.self_attn.attn", "model.layers.3.self_attn.attn"]


@pytest.fixture(scope="module")
def flash_group(tiny_models):
    config = EngineArgs(model=tiny_models["qwen2_5_vl"], max_model_len=2048).create_engine_config()
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float16)
    with set_current_vllm_config(config):
        group = AttentionGroup(backend=FlashAttentionBackend, layer_names=list(LAYERS),
                               kv_cache_spec=spec, kv_cache_group_id=0)
        group.create_metadata_builders(config, torch.device("cpu"))
    return config, group, spec


def _runner_state(query_lens, computed, prompt_lens, block_table, group):
    """The attributes of vLLM's V1 runner that ``_switch_attention`` reads, for one step."""
    query_start = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    query_start[1:] = torch.tensor(query_lens).cumsum(0)
    batch = SimpleNamespace(
        num_reqs=len(query_lens),
        num_computed_tokens_cpu_tensor=torch.tensor(computed, dtype=torch.int32),
        num_prompt_tokens_cpu_tensor=torch.tensor(prompt_lens, dtype=torch.int32),
        block_table=[SimpleNamespace(get_device_tensor=lambda n: block_table[:n])],
    )
    return SimpleNamespace(
        input_batch=batch,
        query_start_loc=SimpleNamespace(cpu=query_start, gpu=query_start.clone()),
        seq_lens=torch.zeros(len(query_lens), dtype=torch.int32),
        attn_groups=[[group]],
    )


def _fields(metadata) -> dict:
    return {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}


def _assert_same(got, want):
    got, want = _fields(got), _fields(want)
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name], want[name]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and torch.equal(a.cpu(), b.cpu()), name
        else:
            assert a == b, name


def _builder_on_pruned_batch(config, group, computed, pruned_query, pruned_seq, block_table,
                             slot_mapping):
    """The same step, written down directly as the pruned batch it became."""
    num_tokens = sum(pruned_query)
    seq_lens = torch.tensor(pruned_seq, dtype=torch.int32)
    query_start = torch.tensor([0] + pruned_query, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    expected = CommonAttentionMetadata(
        query_start_loc=query_start, query_start_loc_cpu=query_start,
        seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens,
        num_reqs=len(pruned_query), num_actual_tokens=num_tokens,
        max_query_len=max(pruned_query), max_seq_len=int(seq_lens.max()),
        block_table_tensor=block_table, slot_mapping=slot_mapping, causal=True,
        is_prefilling=torch.tensor([c == 0 for c in computed]),
    )
    with set_current_vllm_config(config):
        return group.get_metadata_builder().build(0, expected)


# {request: (query length, sequence length) in layers K+1..}: pruned requests; a chunk whose rows
# are all held (none goes on; 10 tokens before its image); survivors outnumbering the step's rows.
LENGTHS = [{1: (15, 15)}, {1: (15, 15), 2: (13, 13)}, {2: (19, 19)}, {1: (0, 10), 2: (26, 26)}]
# A decode (40 tokens computed), and two prompts of 50 and 20 tokens in one step.
QUERY_LENS, COMPUTED, PROMPT_LENS = [1, 50, 20], [40, 0, 0], [30, 50, 20]
BLOCK_TABLE = torch.tensor([[7, 8, 9, 0], [1, 2, 3, 4], [5, 6, 0, 0]], dtype=torch.int32)


def _model_runner_v2_batch(query_lens, computed, prompt_lens) -> InputBatch:
    """MRv2's ``InputBatch`` of one step (vLLM's dummy batch, its fields set to the step's)."""
    n, num_tokens = len(query_lens), sum(query_lens)
    batch = InputBatch.make_dummy(n, num_tokens, InputBuffers(8, 256, torch.device("cpu")))
    starts = np.zeros(n + 1, dtype=np.int32)
    starts[1:] = np.cumsum(query_lens)
    seq_lens = np.array([c + q for c, q in zip(computed, query_lens)], dtype=np.int32)
    computed_np = np.array(computed, dtype=np.int32)
    prefill_np = np.array(prompt_lens, dtype=np.int32)
    return dataclasses.replace(
        batch, num_scheduled_tokens=np.array(query_lens, dtype=np.int32),
        query_start_loc=torch.from_numpy(starts.copy()), query_start_loc_np=starts,
        seq_lens=torch.from_numpy(seq_lens.copy()),
        seq_lens_cpu_upper_bound=torch.from_numpy(seq_lens.copy()),
        num_computed_tokens_np=computed_np, prefill_len_np=prefill_np,
        num_computed_prefill_tokens_np=np.minimum(computed_np, prefill_np),
        is_prefilling_np=computed_np < prefill_np, has_prefill=True,
        positions=torch.cat([torch.arange(c, c + q) for c, q in zip(computed, query_lens)]))


def _switch_on_v1(config, group, spec, lengths, slot_mapping, num_tokens) -> None:
    runner = _runner_state(QUERY_LENS, COMPUTED, PROMPT_LENS, BLOCK_TABLE, group)
    GlimpseRunnerMixin._switch_attention(runner, LAYERS, lengths, slot_mapping, num_tokens)


def _switch_on_v2(config, group, spec, lengths, slot_mapping, num_tokens) -> None:
    batch = _model_runner_v2_batch(QUERY_LENS, COMPUTED, PROMPT_LENS)
    # The state as MRv2 leaves it when the model reaches layer K+1 (prepare_attn's arguments kept).
    state = object.__new__(GlimpseModelState)
    state.model_config = config.model_config
    state.supports_mm_inputs = False
    state._batch = batch
    kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec)])
    step_slots = torch.arange(500, 500 + sum(QUERY_LENS), dtype=torch.int64)[None]
    state._attn_args = ((BLOCK_TABLE,), step_slots, [[group]], kv_cache_config)
    seen = []

    def survivor_positions(step_positions):
        seen.append(step_positions)
        return torch.arange(num_tokens)

    state._switch_attention(LAYERS, lengths, slot_mapping, num_tokens, survivor_positions)
    # the survivors' positions are derived from the step's
    assert len(seen) == 1 and torch.equal(seen[0], batch.positions[:batch.num_tokens])
    # The step's own batch is left as it was (slots and positions are read from it later).
    assert batch.num_tokens == sum(QUERY_LENS) and batch.positions.shape[0] == sum(QUERY_LENS)


@pytest.mark.parametrize("switch", [_switch_on_v1, _switch_on_v2], ids=["v1", "model_runner_v2"])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_rebuilt_flash_metadata_equals_the_builder_on_the_pruned_batch(flash_group, lengths,
                                                                       switch):
    config, group, spec = flash_group
    pruned_query = [lengths.get(i, (q, c + q))[0]
                    for i, (q, c) in enumerate(zip(QUERY_LENS, COMPUTED))]
    pruned_seq = [lengths.get(i, (q, c + q))[1]
                  for i, (q, c) in enumerate(zip(QUERY_LENS, COMPUTED))]
    num_tokens = sum(pruned_query)
    slot_mapping = torch.arange(100, 100 + num_tokens, dtype=torch.int64)
    context = SimpleNamespace(attn_metadata={}, slot_mapping={})
    with set_current_vllm_config(config), override_forward_context(context):
        switch(config, group, spec, lengths, slot_mapping, num_tokens)

    want = _builder_on_pruned_batch(config, group, COMPUTED, pruned_query, pruned_seq, BLOCK_TABLE,
                                    slot_mapping)
    assert set(context.attn_metadata) == set(LAYERS)
    for name in LAYERS:
        assert context.attn_metadata[name] is context.attn_metadata[LAYERS[0]]
        assert torch.equal(context.slot_mapping[name], slot_mapping)
    _assert_same(context.attn_metadata[LAYERS[0]], want)
    assert context.attn_metadata[LAYERS[0]].max_query_len == max(pruned_query)
