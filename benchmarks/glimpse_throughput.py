"""GlimpsePrune vs vanilla vLLM on high-resolution Qwen2.5-VL: req/s, KV blocks, residency.

    .venv/bin/python benchmarks/glimpse_throughput.py [--requests N] [--repeats R]
        [--max-tokens T] [--held-requests H] [--kv-blocks B] [--resident-requests M]
        [--resident-max-tokens T2] [--ratio 0.05] [--layer K] [--image-size 1092]
        [--dtype bfloat16|float32] [--threads T] [--quick]
        [--only vanilla,glimpse] [--json PATH]

Full run (defaults: N 24, R 3, T 32, H 8, B 64, M 64, T2 64, ratio 0.05, 1 thread)::

    .venv/bin/python benchmarks/glimpse_throughput.py --json benchmarks/results/glimpse_image.json

takes roughly 30 to 40 minutes on a quiet 2-core x86 machine (a vanilla prefill of one request,
~1,560 tokens, takes ~5.5 s on one thread, and every engine compiles for 2-3 minutes at start):
the vanilla throughput batches alone are 3 x 24 of them. The text-only and mixed runs of
docs/benchmarks.md take 6 and about 15 minutes. ``--quick`` (a smoke
check of every code path: 2 requests, 1 repeat, 2 held, residency 4 requests in 33 blocks; its
numbers are not the goal measurement) takes about 3 minutes on a quiet machine.

Model: the Qwen2.5-VL bench model of :mod:`vllm_glimpse.testing.bench_models` (~0.31B random
weights: Qwen2 LLM hidden 1024, 22 layers, GQA 16/2 heads; a shallow narrow ViT with the real
patch 14 / merge 2 geometry), so that the LLM's work on the image tokens dominates on a CPU.
GlimpsePrune runs with a synthetic checkpoint sized for it
(:mod:`vllm_glimpse.testing.glimpse_bench`: K = int(0.6 L) = 13 of 22 layers, VIP conditioned on
the ViT's full-attention blocks [3, 1]). Random VIP weights decide nothing meaningful, so the
keep rule is forced with ``fixed_ratio`` (default 0.05: 76 of 1,521 image tokens kept).

Workload: each request is one distinct synthetic image of 1092x1092 pixels (39 x 39 = 1,521
image tokens after the 2x2 merge; ``mm_processor_kwargs={"max_pixels": ...}`` raises the bench
model's 1,280-token cap for both engines) and a short question; greedy, ``ignore_eos``.

Configurations, each in its own subprocess (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni executor,
``OMP_NUM_THREADS`` = --threads, bf16), one after the other:

* ``vanilla``: vLLM without the plugin (``VLLM_PLUGINS=""``), with vLLM's defaults as users run
  it (compiled, prefix caching and chunked prefill on, max_num_batched_tokens 4096 and
  max_num_seqs 256 on the CPU);
* ``glimpse-<ratio>``: the plugin with ``engine_kwargs("glimpse", checkpoint=..., fixed_ratio=
  ratio)``: compiled too (its prune steps run eagerly), prefix caching, chunked prefill and
  max_num_batched_tokens as vanilla's; async scheduling off (vLLM's CPU platform turns it off
  for vanilla too).

Each subprocess runs two engines:

1. *Throughput engine* (``VLLM_CPU_KVCACHE_SPACE`` 4 GiB: ~2,900 blocks of 128 tokens, far more
   than any batch needs):

   * KV blocks held after prefill: H requests through ``llm_engine.add_request``, then
     ``llm_engine.step()`` until every one is in ``scheduler.running`` with
     ``num_computed_tokens >= num_prompt_tokens``; held = free blocks before - free blocks now
     (``scheduler.kv_cache_manager.block_pool``), reported per request. GlimpsePrune frees the
     tail blocks of a pruned request in the step that prunes it, so this is what a request holds
     for the rest of its life. These steps also warm the engine up (the requests are then
     aborted, and the pool is checked to be whole again).
   * Throughput: N requests submitted at once to ``LLM.generate`` (``max_tokens`` T); req/s =
     N / wall time; R timed batches on new images, median reported with (min, max). The wall time
     covers input processing, the vision tower, prefill and decode.

2. *Residency engine*: the same settings with a small KV cache, ``num_gpu_blocks_override`` = B
   for both engines (B - 1 usable blocks of 128 tokens, one is vLLM's null block; at least 33;
   a vanilla request needs 13 blocks) and max_num_seqs 256.
   M requests (``max_tokens`` T2) are added at once and the engine is stepped; after each step
   the number of requests in ``scheduler.running`` whose whole prompt is in the cache (decoding;
   a partial prefill, which vanilla's chunked prefill admits many of, is not counted) is read,
   its maximum is the number reported (and, for the steady state, the median over the last
   half of the steps). Stepping stops when every request is resident at once
   (the count is then capped by M and flagged), or a few steps after the first request finishes
   (by then admission is bound by the KV cache), or after --resident-max-steps; the rest is
   aborted. Preemptions are counted.

   * KV-bound throughput (high concurrency): then ``--kv-bound-requests`` requests (default 64,
     ``--kv-bound-max-tokens`` 64 each) submitted at once to ``LLM.generate`` on this small
     cache and run to the end: req/s when the KV cache, not the request count, bounds the batch
     (vanilla fits 4 requests, GlimpsePrune ~35).

Table columns: prompt tok/req as the engine received it (glimpse: + its glimpse token), image
tok per request, kept prompt tokens after pruning (the request's length from then on), req/s,
KV blk/req after prefill, max resident (a ``*`` marks a count capped by M), process CPU seconds
per request of the median batch, and the mean 1-minute load average during the timed batches
(about 1 per thread when nothing else runs; more means the timings shared the CPU).

Ratios are glimpse / vanilla measured in the same run. The project's goals: req/s >= 2.5x vanilla
(checked on both throughput measurements),
KV blocks held after prefill <= 10% of vanilla, most requests resident at once >= 5x vanilla.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    ENGINE_ENV,
    check_vanilla,
    fmt,
    image_prompts,
    measure_held,
    measure_residency,
    run_worker,
    scheduler_of,
    text_prompts,
    timed_generate,
    worker_env,
    write_json,
)

KV_CACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE of the throughput engine
MAX_MODEL_LEN = 4096
# The vanilla baseline is vLLM as users run it: the platform's defaults (compiled, prefix
# caching, chunked prefill, vLLM's step budget and sequence cap) -- nothing here turns them off.
# The plugin's engines change only what their method needs (vllm_glimpse.engine_kwargs).
ENGINE_ARGS: dict[str, Any] = {
    "max_model_len": MAX_MODEL_LEN,
    "limit_mm_per_prompt": {"image": 1},
    "seed": 0,
    # One process: the engine core and the model runner run inside the worker's process (with
    # VLLM_ENABLE_V1_MULTIPROCESSING=0 below), so the scheduler can be read directly. See
    # benchmarks/visionzip_throughput.py for why (and why 1 thread by default).
    "distributed_executor_backend": "uni",
}
DEFAULT_DTYPE = "bfloat16"

PATCH, MERGE = 14, 2
UNIT = PATCH * MERGE  # 28 pixels per image token side
DEFAULT_IMAGE_SIDE = 1092  # 39 x 39 = 1521 image tokens
MIN_IMAGE_TOKENS = 1500  # the workload this benchmark is for: >= 1,500 image tokens per image

GOAL_SPEEDUP = 2.5
GOAL_HELD = 0.10
GOAL_RESIDENT = 5.0
# against vLLM's defaults: image requests of >= 1,000 image tokens, and text-only requests,
# which a GlimpsePrune engine must not slow down
GOAL_IMAGE_VS_DEFAULTS = 1.3
GOAL_TEXT_VS_DEFAULTS = 0.97
WORKLOADS = ("image", "text", "mixed")


def image_tokens_for(side: int) -> int:
    return (side // UNIT) ** 2


@dataclass
class Config:
    name: str
    kind: str  # vanilla | glimpse
    knobs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Worker (runs in a subprocess): one configuration, two engines
# --------------------------------------------------------------------------------------------


def _prompts(tokenizer, count: int, seed0: int, side: int, workload: str = "image"
             ) -> list[dict[str, Any]]:
    """The workload's requests: each with one distinct image, text only, or mixed (even
    requests with an image, odd ones text only)."""
    if workload == "image":
        return image_prompts(tokenizer, "qwen2_5_vl", count, seed0, (side, side))
    text = text_prompts(tokenizer, count, seed0)
    if workload == "text":
        return text
    images = image_prompts(tokenizer, "qwen2_5_vl", (count + 1) // 2, seed0, (side, side))
    return [images[i // 2] if i % 2 == 0 else text[i] for i in range(count)]


def _engine(spec: dict[str, Any], cfg: Config, blocks: int | None):
    from vllm import LLM

    kwargs = dict(ENGINE_ARGS, dtype=spec["dtype"],
                  mm_processor_kwargs={"max_pixels": spec["max_pixels"]})
    if blocks is not None:
        kwargs["num_gpu_blocks_override"] = blocks
    if cfg.kind == "glimpse":
        import vllm_glimpse

        kwargs.update(vllm_glimpse.engine_kwargs("glimpse", **cfg.knobs))
    llm = LLM(model=spec["model"], **kwargs)
    if cfg.kind == "vanilla":  # vanilla must not run our code
        check_vanilla(llm)
    return llm


def _engine_facts(llm) -> dict[str, Any]:
    vc = llm.llm_engine.vllm_config
    sched = scheduler_of(llm)
    return dict(
        scheduler_class=type(sched).__name__,
        model_class=llm.collective_rpc(lambda w: type(w.get_model()).__name__)[0],
        block_size=sched.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
        num_blocks=sched.kv_cache_manager.block_pool.get_num_free_blocks(),
        enable_chunked_prefill=vc.scheduler_config.enable_chunked_prefill,
        enable_prefix_caching=vc.cache_config.enable_prefix_caching,
        max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens,
        max_num_seqs=vc.scheduler_config.max_num_seqs,
        max_model_len=vc.model_config.max_model_len,
        enforce_eager=vc.model_config.enforce_eager,
    )


def measure_throughput(llm, tokenizer, spec: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    from vllm import SamplingParams

    from vllm_glimpse.stats import STATS_KEY

    n, side = spec["requests"], spec["image_side"]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    rec: dict[str, list] = {k: [] for k in ("times_s", "process_cpu_s", "loadavg_1min",
                                            "prompt_tokens", "image_tokens", "kept_prompt_tokens",
                                            "kept_image_tokens", "output_tokens")}
    for r in range(spec["repeats"]):
        prompts = _prompts(tokenizer, n, 10_000 + r * n, side, spec["workload"])
        outs, timing = timed_generate(llm, prompts, params)
        rec["times_s"].append(timing["seconds"])
        rec["process_cpu_s"].append(timing["process_cpu_s"])
        rec["loadavg_1min"].append(timing["loadavg_1min"])
        prompt_tok = [len(o.prompt_token_ids) for o in outs]
        image_tok = [sum(1 for t in o.prompt_token_ids if t == image_token_id) for o in outs]
        stats = [(o.kv_transfer_params or {}).get(STATS_KEY) for o in outs]
        if any(s is None and n_img for s, n_img in zip(stats, image_tok)) and any(stats):
            raise SystemExit("some image requests of the glimpse engine carry no pruning stats")
        kept_prompt = [s["prompt_tokens_after"] if s else p for s, p in zip(stats, prompt_tok)]
        kept_image = [s["image_tokens_after"] if s else i for s, i in zip(stats, image_tok)]
        rec["prompt_tokens"].append(statistics.mean(prompt_tok))
        rec["image_tokens"].append(statistics.mean(image_tok))
        rec["kept_prompt_tokens"].append(statistics.mean(kept_prompt))
        rec["kept_image_tokens"].append(statistics.mean(kept_image))
        rec["output_tokens"].append(sum(len(o.outputs[0].token_ids) for o in outs))
    return rec


def measure_kv_bound_throughput(llm, tokenizer, spec: dict[str, Any]) -> dict[str, Any]:
    """req/s when the KV cache, not the request count, bounds the batch: every request submitted
    at once to the small-cache engine and run to the end (one timed ``LLM.generate``)."""
    from vllm import SamplingParams

    n, tokens = spec["kv_bound_requests"], spec["kv_bound_max_tokens"]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompts = _prompts(tokenizer, n, 900_000, spec["image_side"], spec["workload"])
    _, timing = timed_generate(llm, prompts, params)
    return dict(requests=n, max_tokens=tokens, req_s=n / timing["seconds"], **timing)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    t_import = time.perf_counter()
    import vllm  # noqa: F401

    from vllm_glimpse.testing.generate import shutdown

    phases: dict[str, float] = {"import_s": time.perf_counter() - t_import}
    cfg = Config(**spec["config"])
    side = spec["image_side"]
    result: dict[str, Any] = dict(phases=phases)

    # ---- engine 1: held blocks (also the warm-up) and throughput -----------------------------
    t = time.perf_counter()
    llm = _engine(spec, cfg, None)
    phases["engine_start_s"] = time.perf_counter() - t
    result["engine"] = _engine_facts(llm)
    tokenizer = llm.get_tokenizer()
    image_token_id = llm.llm_engine.model_config.hf_config.image_token_id
    t = time.perf_counter()
    held_prompts = _prompts(tokenizer, spec["held_requests"], 1000, side, spec["workload"])
    result["held"] = measure_held(llm, held_prompts, max_tokens=64)
    phases["held_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result["throughput"] = measure_throughput(llm, tokenizer, spec, image_token_id)
    phases["throughput_s"] = time.perf_counter() - t
    tp = result["throughput"]
    pruning = spec["workload"] != "text"
    if pruning and cfg.kind == "glimpse" and max(tp["kept_image_tokens"]) >= max(tp["image_tokens"]):
        raise SystemExit("the glimpse engine did not prune (no request carries pruning stats "
                         "with fewer image tokens)")
    if spec["workload"] == "image" and min(tp["image_tokens"]) < MIN_IMAGE_TOKENS:
        raise SystemExit(f"images gave {min(result['throughput']['image_tokens'])} image tokens, "
                         f"fewer than {MIN_IMAGE_TOKENS}: is max_pixels applied?")
    t = time.perf_counter()
    shutdown(llm)
    phases["shutdown_s"] = time.perf_counter() - t

    # ---- engine 2: residency under a small KV cache --------------------------------------------
    if spec["kv_blocks"]:
        t = time.perf_counter()
        llm = _engine(spec, cfg, spec["kv_blocks"])
        phases["engine2_start_s"] = time.perf_counter() - t
        result["engine2"] = _engine_facts(llm)
        tokenizer = llm.get_tokenizer()
        prompts = _prompts(tokenizer, spec["resident_requests"], 500_000, side, spec["workload"])
        t = time.perf_counter()
        result["residency"] = measure_residency(llm, prompts, spec["resident_max_tokens"],
                                                spec["resident_max_steps"], spec["extra_steps"])
        phases["residency_s"] = time.perf_counter() - t
        if spec["kv_bound_requests"]:
            t = time.perf_counter()
            result["kv_bound"] = measure_kv_bound_throughput(llm, tokenizer, spec)
            phases["kv_bound_s"] = time.perf_counter() - t
        t = time.perf_counter()
        shutdown(llm)
        phases["shutdown2_s"] = time.perf_counter() - t
    return result


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_config(cfg: Config, model: str, args, log) -> dict[str, Any]:
    spec = dict(config=asdict(cfg), model=model, requests=args.requests, repeats=args.repeats,
                max_tokens=args.max_tokens, dtype=args.dtype, image_side=args.image_size,
                workload=args.workload,
                max_pixels=args.max_pixels, held_requests=args.held_requests,
                kv_blocks=args.kv_blocks,
                resident_requests=args.resident_requests,
                resident_max_tokens=args.resident_max_tokens,
                resident_max_steps=args.resident_max_steps, extra_steps=args.extra_steps,
                kv_bound_requests=args.kv_bound_requests,
                kv_bound_max_tokens=args.kv_bound_max_tokens)
    env = worker_env(args.threads, KV_CACHE_GIB, ENGINE_ENV, plugin=cfg.kind != "vanilla")
    result, reason, wall, stderr = run_worker(__file__, spec, env, args.timeout)
    if result is None:
        log(f"  {cfg.name}: FAILED ({reason[:300]})")
        if args.verbose:
            log(stderr[-8000:])
        return dict(config=asdict(cfg), error=reason, stderr_tail=stderr[-8000:], wall_s=wall)
    result.update(config=asdict(cfg), wall_s=wall)
    tp = result["throughput"]
    msg = (f"  {cfg.name}: {args.requests / statistics.median(tp['times_s']):.3f} req/s, "
           f"{result['held']['held_blocks_per_req']:.2f} blocks/req after prefill")
    if "residency" in result:
        msg += f", max resident {result['residency']['max_resident']}"
    if "kv_bound" in result:
        msg += f", {result['kv_bound']['req_s']:.3f} req/s in {args.kv_blocks} blocks"
    log(msg + f" (subprocess {wall:.0f} s)")
    return result


def summarize(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    lines = []
    for res in rows:
        if "error" in res:
            lines.append(dict(name=res["config"]["name"], error=res["error"]))
            continue
        tp, held = res["throughput"], res["held"]
        rps = [n / t for t in tp["times_s"]]
        med_t = statistics.median(tp["times_s"])
        ln = dict(name=res["config"]["name"], kind=res["config"]["kind"],
                  req_s=n / med_t, req_s_min=min(rps), req_s_max=max(rps), times_s=tp["times_s"],
                  prompt_tok_per_req=statistics.median(tp["prompt_tokens"]),
                  image_tok_per_req=statistics.median(tp["image_tokens"]),
                  kept_prompt_tok_per_req=statistics.median(tp["kept_prompt_tokens"]),
                  kept_image_tok_per_req=statistics.median(tp["kept_image_tokens"]),
                  cpu_s_per_req=statistics.median(tp["process_cpu_s"]) / n,
                  loadavg=statistics.mean(tp["loadavg_1min"]),
                  held_blocks_per_req=held["held_blocks_per_req"], block_size=held["block_size"],
                  held_pool_whole=held["pool_whole_after_abort"])
        res_ = res.get("residency")
        if res_:
            ln.update(max_resident=res_["max_resident"], resident_capped=res_["capped"],
                      median_resident=res_["median_resident_2nd_half"],
                      kv_blocks=res_["num_blocks"], resident_stop=res_["stop"],
                      preemptions=res_["preemptions"], resident_steps=res_["steps"])
        kvb = res.get("kv_bound")
        if kvb:
            ln.update(kv_bound_req_s=kvb["req_s"], kv_bound_seconds=kvb["seconds"],
                      kv_bound_cpu_s_per_req=kvb["process_cpu_s"] / kvb["requests"],
                      kv_bound_loadavg=kvb["loadavg_1min"])
        lines.append(ln)
    vanilla = next((ln for ln in lines if ln.get("kind") == "vanilla"), None)
    for ln in lines:
        if "error" in ln:
            continue
        ok = vanilla is not None
        ln["x_vanilla"] = ln["req_s"] / vanilla["req_s"] if ok else None
        ln["x_vanilla_best"] = ln["req_s_max"] / vanilla["req_s_max"] if ok else None
        ln["held_vs_vanilla"] = (ln["held_blocks_per_req"] / vanilla["held_blocks_per_req"]
                                 if ok and vanilla["held_blocks_per_req"] else None)
        ln["resident_x_vanilla"] = (ln["max_resident"] / vanilla["max_resident"]
                                    if ok and ln.get("max_resident") is not None
                                    and vanilla.get("max_resident") else None)
        ln["kv_bound_x_vanilla"] = (ln["kv_bound_req_s"] / vanilla["kv_bound_req_s"]
                                    if ok and ln.get("kv_bound_req_s")
                                    and vanilla.get("kv_bound_req_s") else None)
    return lines


def print_table(lines: list[dict[str, Any]]) -> None:
    head = (f"{'config':<14} {'prompt tok/req':>14} {'image tok':>9} {'kept prompt':>11} "
            f"{'req/s median (min–max)':>24} {'x vanilla':>9} {'KV blk/req':>10} "
            f"{'x vanilla':>9} {'max resident':>12} {'x vanilla':>9} {'CPU s/req':>9} {'load':>5}")
    print(head)
    print("-" * len(head))
    for ln in lines:
        if "error" in ln:
            print(f"{ln['name']:<14} not run: {ln['error'][:200]}")
            continue
        spread = f"{ln['req_s']:.3f} ({ln['req_s_min']:.3f}–{ln['req_s_max']:.3f})"
        resident = ("—" if ln.get("max_resident") is None else
                    f"{ln['max_resident']}{'*' if ln['resident_capped'] else ''}")
        print(f"{ln['name']:<14} {ln['prompt_tok_per_req']:>14.1f} {ln['image_tok_per_req']:>9.0f} "
              f"{ln['kept_prompt_tok_per_req']:>11.1f} {spread:>24} "
              f"{fmt(ln['x_vanilla'], '.2f'):>9} {ln['held_blocks_per_req']:>10.2f} "
              f"{fmt(ln['held_vs_vanilla'], '.3f'):>9} {resident:>12} "
              f"{fmt(ln['resident_x_vanilla'], '.2f'):>9} {ln['cpu_s_per_req']:>9.2f} "
              f"{ln['loadavg']:>5.1f}")
    kv_rows = [ln for ln in lines if ln.get("kv_bound_req_s")]
    if kv_rows:
        print()
        print("KV-bound throughput (every request at once into the small KV cache, run to the end):")
        for ln in kv_rows:
            print(f"  {ln['name']:<14} {ln['kv_bound_req_s']:.4f} req/s "
                  f"({ln['kv_bound_seconds']:.0f} s), x vanilla "
                  f"{fmt(ln['kv_bound_x_vanilla'], '.2f')}, CPU s/req "
                  f"{ln['kv_bound_cpu_s_per_req']:.2f}, load {ln['kv_bound_loadavg']:.1f}")
    if any(ln.get("resident_capped") for ln in lines):
        print("* every request was resident at once: the count is capped by --resident-requests")


def goal_checks(lines: list[dict[str, Any]], quick: bool, workload: str = "image") -> list[str]:
    g = next((ln for ln in lines if ln.get("kind") == "glimpse"), None)
    v = next((ln for ln in lines if ln.get("kind") == "vanilla"), None)
    tag = " [--quick: smoke check, not the goal measurement]" if quick else ""
    if g is None or v is None:
        return [f"GOALS: not measured (glimpse or vanilla row missing) -> FAIL{tag}"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    out = []
    x, xb = g["x_vanilla"], g["x_vanilla_best"]
    if workload == "text":
        return [f"GOAL text-only req/s >= {GOAL_TEXT_VS_DEFAULTS}x vanilla's defaults: {x:.2f}x on "
                f"medians ({xb:.2f}x best-of-repeats) -> {verdict(x >= GOAL_TEXT_VS_DEFAULTS)}{tag}"]
    if workload == "image":
        out.append(f"GOAL image req/s (>= 1,000 image tokens) >= {GOAL_IMAGE_VS_DEFAULTS}x "
                   f"vanilla's defaults: {x:.2f}x on medians ({xb:.2f}x best-of-repeats) -> "
                   f"{verdict(x >= GOAL_IMAGE_VS_DEFAULTS and g['image_tok_per_req'] >= 1000)}{tag}")
    else:
        return [f"mixed req/s: {x:.2f}x vanilla's defaults on medians ({xb:.2f}x best-of-repeats)"]
    out.append(f"GOAL req/s >= {GOAL_SPEEDUP}x vanilla: {x:.2f}x on medians ({xb:.2f}x "
               f"best-of-repeats) with a KV cache larger than any batch -> "
               f"{verdict(x >= GOAL_SPEEDUP)}{tag}")
    k = g.get("kv_bound_x_vanilla")
    if k is not None:
        out.append(f"GOAL req/s >= {GOAL_SPEEDUP}x vanilla, KV-bound ({g['kv_blocks']} blocks, "
                   f"{v.get('max_resident')} vanilla requests fit): {k:.2f}x -> "
                   f"{verdict(k >= GOAL_SPEEDUP)}{tag}")
    h = g["held_vs_vanilla"]
    out.append(f"GOAL KV blocks held after prefill <= {GOAL_HELD:.0%} of vanilla: "
               f"{g['held_blocks_per_req']:.2f} vs {v['held_blocks_per_req']:.2f} blocks/request "
               f"= {fmt(h, '.1%')} -> {verdict(h is not None and h <= GOAL_HELD)}{tag}")
    r = g.get("resident_x_vanilla")
    if r is None:
        out.append(f"GOAL most requests resident >= {GOAL_RESIDENT}x vanilla: not measured "
                   f"-> FAIL{tag}")
    else:
        capped = (" (glimpse capped by the request count: a lower bound)"
                  if g["resident_capped"] else "")
        out.append(f"GOAL most requests resident at once >= {GOAL_RESIDENT}x vanilla: "
                   f"{g['max_resident']} vs {v['max_resident']} in {g['kv_blocks']} blocks = "
                   f"{r:.2f}x{capped} -> {verdict(r >= GOAL_RESIDENT)}{tag}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=24, help="N requests per timed batch")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per engine")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (timed)")
    p.add_argument("--held-requests", type=int, default=8,
                   help="requests in the KV-blocks-held-after-prefill measurement")
    p.add_argument("--kv-blocks", type=int, default=64,
                   help="num_gpu_blocks_override of the residency engine (0: skip residency)")
    p.add_argument("--resident-requests", type=int, default=64,
                   help="requests submitted at once in the residency measurement")
    p.add_argument("--resident-max-tokens", type=int, default=64,
                   help="output tokens per request in the residency measurement")
    p.add_argument("--resident-max-steps", type=int, default=400)
    p.add_argument("--extra-steps", type=int, default=4,
                   help="residency: steps after the first request finishes")
    p.add_argument("--kv-bound-requests", type=int, default=64,
                   help="requests of the KV-bound throughput run in the residency engine "
                        "(0: skip)")
    p.add_argument("--kv-bound-max-tokens", type=int, default=64,
                   help="output tokens per request of the KV-bound throughput run")
    p.add_argument("--ratio", type=float, default=0.05, help="GlimpsePrune fixed_ratio")
    p.add_argument("--layer", type=int, default=None,
                   help="K of the synthetic checkpoint (default int(0.6 * layers) = 13)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIDE,
                   help=f"square image side in pixels (default {DEFAULT_IMAGE_SIDE}: "
                        f"{image_tokens_for(DEFAULT_IMAGE_SIDE)} image tokens)")
    p.add_argument("--workload", default="image", choices=WORKLOADS,
                   help="requests with one image each (default), text only, or mixed (half "
                        "and half)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each engine")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 2 requests, 1 repeat, 2 held, residency 4 requests x 8 "
                        "tokens in 33 blocks")
    p.add_argument("--only", default=None, help="comma list of vanilla, glimpse (default both)")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--timeout", type=float, default=5400, help="seconds per subprocess")
    p.add_argument("--verbose", action="store_true", help="print a failed worker's stderr")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = worker(json.loads(Path(args.worker).read_text()))
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    if args.quick:
        args.requests, args.repeats, args.held_requests = 2, 1, 2
        args.kv_blocks, args.resident_requests, args.resident_max_tokens = 33, 4, 8
        args.kv_bound_requests, args.kv_bound_max_tokens = 4, 8
        args.extra_steps = 0
    if args.image_size % UNIT:
        p.error(f"--image-size must be a multiple of {UNIT}")
    if image_tokens_for(args.image_size) < MIN_IMAGE_TOKENS:
        log_warn = f"WARNING: {image_tokens_for(args.image_size)} image tokens < {MIN_IMAGE_TOKENS}"
        print(log_warn, file=sys.stderr)
    # processor cap, with headroom so that the image is not resized down
    args.max_pixels = max(1003520, (image_tokens_for(args.image_size) + 64) * UNIT * UNIT)
    min_blocks = -(-MAX_MODEL_LEN // 128) + 1  # one max_model_len request + vLLM's null block
    if args.kv_blocks and args.kv_blocks < min_blocks:
        p.error(f"--kv-blocks {args.kv_blocks}: at least {min_blocks} blocks of 128 tokens "
                f"(vLLM checks that one max_model_len {MAX_MODEL_LEN} request fits; one block "
                f"is vLLM's null block)")

    from vllm_glimpse.testing.bench_models import bench_model_path, parameter_counts
    from vllm_glimpse.testing.glimpse_bench import bench_glimpse_checkpoint

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model = str(bench_model_path("qwen2_5_vl"))
    counts = parameter_counts("qwen2_5_vl", model)
    ckpt = bench_glimpse_checkpoint("qwen2_5_vl", args.layer)
    ckpt_cfg = json.loads((ckpt / "config.json").read_text())
    cfgs = [Config("vanilla", "vanilla"),
            Config(f"glimpse-{args.ratio:g}", "glimpse",
                   {"checkpoint": str(ckpt), "fixed_ratio": args.ratio})]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        cfgs = [c for c in cfgs if c.kind in wanted or c.name in wanted]
    log(f"model {model} ({counts['total'] / 1e6:.1f}M parameters); checkpoint {ckpt} "
        f"(K {ckpt_cfg['reduce_layer']}, visual layers {ckpt_cfg['selected_visual_layers']})")

    t_all = time.perf_counter()
    rows = [run_config(c, model, args, log) for c in cfgs]
    total = time.perf_counter() - t_all
    lines = summarize(rows, args.requests)
    checks = goal_checks(lines, args.quick, args.workload)

    c = counts
    n_img = image_tokens_for(args.image_size)
    print("\nGlimpsePrune offline throughput and KV use (vllm-cpu 0.32, random-weight bench model)")
    print(f"model: Qwen2.5-VL bench, {c['total'] / 1e6:.1f}M parameters "
          f"(LLM {c['llm'] / 1e6:.1f}M, "
          f"ViT {c['vision'] / 1e6:.1f}M, merger {c['projector'] / 1e6:.1f}M); GlimpsePrune "
          f"synthetic checkpoint K {ckpt_cfg['reduce_layer']} of {ckpt_cfg['num_hidden_layers']} "
          f"layers, fixed_ratio {args.ratio:g}")
    what = {"image": f"{args.image_size}x{args.image_size} images -> {n_img} image tokens, one "
                     "per request + a short question",
            "text": "text only: a distinct short question per request",
            "mixed": f"mixed: even requests one {args.image_size}x{args.image_size} image "
                     f"({n_img} image tokens) + a question, odd ones text only"}[args.workload]
    print(f"workload: {what}; {args.requests} requests per timed batch, "
          f"{args.repeats} batches, max_tokens {args.max_tokens} (greedy, ignore_eos)")
    print(f"engine: dtype {args.dtype}, max_model_len {MAX_MODEL_LEN}, otherwise vLLM's defaults, "
          f"OMP_NUM_THREADS {args.threads} ({os.cpu_count()} CPUs), "
          f"{', '.join(f'{k}={v}' for k, v in ENGINE_ENV.items())}")
    for res in rows:
        if "engine" in res:
            e = res["engine"]
            print(f"  {res['config']['name']}: {e['model_class']} / {e['scheduler_class']}, "
                  f"compiled {not e['enforce_eager']}, chunked prefill "
                  f"{e['enable_chunked_prefill']}, prefix caching {e['enable_prefix_caching']}, "
                  f"max_num_batched_tokens {e['max_num_batched_tokens']}, max_num_seqs "
                  f"{e['max_num_seqs']}, {e['num_blocks']} blocks of {e['block_size']}")
    print(f"KV blk/req: blocks held per request once {args.held_requests} requests finished "
          f"prefill; max resident: most requests holding KV blocks at once with "
          f"num_gpu_blocks_override {args.kv_blocks}, {args.resident_requests} requests x "
          f"{args.resident_max_tokens} tokens")
    print()
    print_table(lines)
    print()
    for res in rows:
        if "phases" in res:
            ph = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in res["phases"].items())
            print(f"  {res['config']['name']}: {ph}")
            if "residency" in res:
                r = res["residency"]
                print(f"    residency: max {r['max_resident']} resident, median "
                      f"{r['median_resident_2nd_half']:g} over the last half of the "
                      f"{r['steps']} steps ({r['seconds']:.0f} s); stop: {r['stop']}; "
                      f"{r['preemptions']} preemptions of {r['preempted_requests']} requests; "
                      f"most blocks in use {r['max_blocks_in_use']} of {r['num_blocks']}")
            if not res["held"]["pool_whole_after_abort"]:
                print("    WARNING: KV pool not whole after aborting the held-blocks requests")
    print()
    for line in checks:
        print(line)
    print(f"\ntotal wall time {total:.0f} s")
    if args.json:
        report = dict(
            settings=dict(engine_args=ENGINE_ARGS, engine_env=ENGINE_ENV, dtype=args.dtype,
                          kv_cache_gib=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)),
                          requests=args.requests, repeats=args.repeats, max_tokens=args.max_tokens,
                          held_requests=args.held_requests, kv_blocks=args.kv_blocks,
                          resident_requests=args.resident_requests,
                          resident_max_tokens=args.resident_max_tokens,
                          kv_bound_requests=args.kv_bound_requests,
                          kv_bound_max_tokens=args.kv_bound_max_tokens,
                          workload=args.workload, image_size=args.image_size, image_tokens=n_img,
                          max_pixels=args.max_pixels, ratio=args.ratio, quick=args.quick,
                          threads=args.threads, cpu_count=os.cpu_count()),
            model=dict(path=model, parameters=counts),
            checkpoint=dict(path=str(ckpt), config=ckpt_cfg),
            runs=rows, table=lines, goals=checks, total_wall_s=total)
        write_json(args.json, report)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
