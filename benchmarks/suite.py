"""Benchmark suite: vanilla vLLM, VisionZip and GlimpsePrune on the same workloads, in one run.

    .venv/bin/python benchmarks/suite.py [--quick] [--workloads W1,W2] [--online W1,W2]
        [--out DIR] [--requests N] [--repeats R] [--max-tokens T] [--threads T]

writes ``DIR/report.json`` and PNG plots (``DIR/offline.png``: throughput, KV blocks, residency;
``DIR/online.png``: time to first token and inter-token latency) and prints the tables.
``--quick`` is a smoke check of every code path (small counts, one workload per family, a short
online sweep on llava-336, two configurations at once; minutes on a 2-core CPU; its figures are
not measurements).

Workloads (synthetic images generated here, one image and a short question per request, greedy,
``ignore_eos``):

========================  =======================================  ==========================
workload                  model                                    image tokens per request
========================  =======================================  ==========================
``llava-336``             LLaVA-1.5 bench model (0.31B: Llama      576 (336 px)
                          hidden 1024 x 20 layers, CLIP 336/14)
``llava_next-anyres``     LLaVA-NeXT tiny test model (Llama        2,880 (672 x 672 px:
                          hidden 256 x 4 layers, CLIP 336/14)      base + 2 x 2 crops)
``qwen-448/896/1344``     Qwen2.5-VL bench model (0.31B: Qwen2     256 / 1,024 / 2,304
                          hidden 1024 x 22 layers, ViT 4 blocks)
``qwen3-896``             Qwen3-VL bench model (0.27B: Qwen3       784 (896 px, patch 16)
                          hidden 1024 x 22 layers, ViT 4 blocks,
                          3 DeepStack taps)
========================  =======================================  ==========================

The bench models (``vllm_glimpse.testing.bench_models``, random weights, real image-token
geometry, a shallow vision tower) are sized so that the LLM's work on the image tokens dominates;
the report states each model's parameter counts. LLaVA-NeXT has no bench-size model: its tiny
test model is used (its image tokens dominate even more; its timings are mostly overheads).

Configurations per workload, each in its own fresh process (``benchmarks/common.py``):

* ``vanilla``: vLLM without the plugin (``VLLM_PLUGINS=""``);
* ``visionzip``: LLaVA D + C = 54 + 10 per image (per crop on NeXT, the authors' split),
  Qwen2.5-VL and Qwen3-VL ratios 0.10 / 0.02 (about 11 % of the image's tokens);
* ``glimpse``: GlimpsePrune with a synthetic checkpoint for the bench model
  (``vllm_glimpse.testing.glimpse_bench``: K = int(0.6 L)), keep ratio forced to 0.10
  (``fixed_ratio``; random VIP weights decide nothing meaningful) -- a budget like VisionZip's.
  Not for LLaVA-NeXT (no GlimpsePrune checkpoint exists for it);
* ``limit``: vanilla vLLM on prompts that already hold only the kept image tokens (random
  ``image_embeds`` of exactly VisionZip's and GlimpsePrune's counts: no vision tower, no pruning).

Measured per configuration (offline, ``LLM.generate`` in the worker's process, one OpenMP
thread by default, bf16):

* throughput: N requests submitted at once, R timed batches on new images after a warm-up:
  requests/s and prompt tokens/s (prompt tokens as submitted, before pruning), median (min-max);
* KV blocks held per request once every request has finished its prefill (vLLM's block pool);
* most requests resident at once (whole prompt in the KV cache) in a small KV cache of B blocks.

Online (``--online``): each configuration behind a real ``vllm serve`` on loopback, measured by
vLLM's ``vllm bench serve`` at each concurrency (streaming chat completions, one new random image
of the workload's size per request: its ``random-mm`` dataset): time to first token and
inter-token latency, median and p90; the plugin's ``/metrics`` counters are read around it.

Every figure is also given as a ratio to vanilla measured in the same run: the ratio of the
medians, and the range (worst min/max pairing) over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import (
    ENGINE_ENV,
    QUESTIONS,
    bench_serve,
    fmt,
    image_prompts,
    measure_held,
    measure_residency,
    metrics_delta,
    ratio,
    run_worker,
    scrape_metrics,
    serve,
    summary,
    worker_env,
    write_json,
)

KV_CACHE_GIB = 4
# The suite's requests cycle through the first six questions (the workload its results were measured on).
QUESTIONS = QUESTIONS[:6]
MAX_MODEL_LEN = 4096
# The vanilla baseline is vLLM as users run it: the platform's defaults (compiled, prefix
# caching, chunked prefill, vLLM's step budget and sequence cap) -- nothing here turns them off.
# The plugin's engines change only what their method needs (vllm_glimpse.engine_kwargs).
ENGINE_ARGS: dict[str, Any] = {
    "max_model_len": MAX_MODEL_LEN,
    "limit_mm_per_prompt": {"image": 1},
    "seed": 0,
    "distributed_executor_backend": "uni",
}
VISIONZIP_LLAVA = {"dominant": 54, "contextual": 10}
VISIONZIP_QWEN = {"dominant_ratio": 0.10, "contextual_ratio": 0.02}
GLIMPSE_RATIO = 0.10


@dataclass
class Workload:
    name: str
    family: str  # llava | llava_next | qwen2_5_vl | qwen3_vl
    side: int  # square images of side x side px
    methods: tuple[str, ...]
    image_tokens: int  # per request, unpruned
    crops: int = 1  # LLaVA-NeXT: base image + crops


WORKLOADS = {
    "llava-336": Workload("llava-336", "llava", 336, ("visionzip", "glimpse"), 576),
    "llava_next-anyres": Workload("llava_next-anyres", "llava_next", 672, ("visionzip",),
                                  576 * 5, crops=5),
    "qwen-448": Workload("qwen-448", "qwen2_5_vl", 448, ("visionzip", "glimpse"), 16 * 16),
    "qwen-896": Workload("qwen-896", "qwen2_5_vl", 896, ("visionzip", "glimpse"), 32 * 32),
    "qwen-1344": Workload("qwen-1344", "qwen2_5_vl", 1344, ("visionzip", "glimpse"), 48 * 48),
    # Qwen3-VL: no GlimpsePrune checkpoint exists for it
    "qwen3-896": Workload("qwen3-896", "qwen3_vl", 896, ("visionzip",), 28 * 28),
}
QUICK_WORKLOADS = ("llava-336", "llava_next-anyres", "qwen-448", "qwen3-896")


def kept_tokens(w: Workload, method: str) -> int:
    """Image tokens a request keeps under ``method`` (what the limit run feeds as embeddings)."""
    from vllm_glimpse.settings import visionzip_counts

    if method == "visionzip":
        if w.family.startswith("qwen"):
            return sum(visionzip_counts(w.image_tokens, VISIONZIP_QWEN["dominant_ratio"],
                                        VISIONZIP_QWEN["contextual_ratio"]))
        # LLaVA-NeXT: D + C per crop, base image included (the authors' NeXT code)
        return (VISIONZIP_LLAVA["dominant"] + VISIONZIP_LLAVA["contextual"]) * w.crops
    # GlimpsePrune's fixed ratio: clamp(int(r N), 1, N) (keep_rule.py)
    return max(1, int(GLIMPSE_RATIO * w.image_tokens))


@dataclass
class Config:
    name: str
    kind: str  # vanilla | visionzip | glimpse | limit
    knobs: dict[str, Any] = field(default_factory=dict)
    limit_tokens: dict[str, int] = field(default_factory=dict)  # limit: method -> kept tokens


def configs_for(w: Workload) -> list[Config]:
    out = [Config("vanilla", "vanilla")]
    for method in w.methods:
        if method == "visionzip":
            out.append(Config("visionzip", "visionzip",
                              VISIONZIP_QWEN if w.family.startswith("qwen") else VISIONZIP_LLAVA))
        else:
            out.append(Config("glimpse", "glimpse", {"fixed_ratio": GLIMPSE_RATIO}))
    out.append(Config("limit", "limit", limit_tokens={m: kept_tokens(w, m) for m in w.methods}))
    return out


def model_path(family: str) -> str:
    if family == "llava_next":
        from vllm_glimpse.testing.tiny_models import tiny_model_path

        return str(tiny_model_path("llava_next"))
    from vllm_glimpse.testing.bench_models import bench_model_path

    return str(bench_model_path(family))


# --------------------------------------------------------------------------------------------
# Worker (its own process): one configuration of one workload
# --------------------------------------------------------------------------------------------


def _prompts(spec, tokenizer, count: int, seed0: int, embed_tokens: int | None = None,
             hidden: int = 0, dtype=None) -> list[dict[str, Any]]:
    return image_prompts(tokenizer, spec["family"], count, seed0, (spec["side"], spec["side"]),
                         questions=QUESTIONS, embed_tokens=embed_tokens, hidden=hidden,
                         dtype=dtype)


def _engine(spec, cfg: Config, blocks: int | None):
    from vllm import LLM

    kwargs = dict(ENGINE_ARGS, dtype=spec["dtype"])
    if spec["family"] == "qwen2_5_vl":  # lift the model's pixel cap so 1344 px stays 1344 px
        kwargs["mm_processor_kwargs"] = {"max_pixels": spec["side"] ** 2}
    if blocks is not None:  # the residency engine: a small cache, a context that fits in it
        kwargs["num_gpu_blocks_override"] = blocks
        kwargs["max_model_len"] = spec["resident_max_len"]
    if cfg.kind == "limit":
        kwargs["enable_mm_embeds"] = True
    if cfg.kind in ("visionzip", "glimpse"):
        import vllm_glimpse

        knobs = dict(cfg.knobs)
        if cfg.kind == "glimpse":
            knobs["checkpoint"] = spec["checkpoint"]
        kwargs.update(vllm_glimpse.engine_kwargs(cfg.kind, **knobs))
    return LLM(model=spec["model"], **kwargs)


def _throughput(llm, prompts_for, spec) -> dict[str, Any]:
    from vllm import SamplingParams

    from vllm_glimpse.stats import STATS_KEY

    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    n = spec["requests"]
    llm.generate(prompts_for(max(2, n // 4), 90_000), params, use_tqdm=False)  # warm-up
    rec: dict[str, list] = {"times_s": [], "prompt_tokens": [], "kept_image_tokens": []}
    for r in range(spec["repeats"]):
        prompts = prompts_for(n, 10_000 + r * n)  # images built before the clock starts
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        rec["times_s"].append(time.perf_counter() - start)
        if any(len(o.outputs[0].token_ids) != spec["max_tokens"] for o in outs):
            raise SystemExit("a request produced fewer than max_tokens tokens")
        rec["prompt_tokens"].append(statistics.mean(len(o.prompt_token_ids) for o in outs))
        stats = [(o.kv_transfer_params or {}).get(STATS_KEY) for o in outs]
        if all(s is not None for s in stats):
            rec["prompt_tokens"][-1] = statistics.mean(s["prompt_tokens_before"] for s in stats)
            rec["kept_image_tokens"].append(statistics.mean(s["image_tokens_after"] for s in stats))
    return rec


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm_glimpse.testing.generate import shutdown

    cfg = Config(**spec["config"])
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    llm = _engine(spec, cfg, None)
    result["engine_start_s"] = time.perf_counter() - t0
    tokenizer = llm.get_tokenizer()
    hf_config = llm.llm_engine.model_config.hf_config
    hidden = hf_config.get_text_config().hidden_size
    if spec["family"] == "qwen3_vl":  # image embeddings carry each DeepStack tap's channels too
        hidden *= 1 + len(hf_config.vision_config.deepstack_visual_indexes)
    dtype = llm.llm_engine.model_config.dtype
    if cfg.kind == "limit":
        result["throughput"] = {
            method: _throughput(llm, lambda c, s, k=kept: _prompts(spec, tokenizer, c, s, k, hidden,
                                                                   dtype), spec)
            for method, kept in cfg.limit_tokens.items()}
        shutdown(llm)
        return result
    result["held"] = measure_held(llm, _prompts(spec, tokenizer, spec["held_requests"], 1000),
                                     max_tokens=16)
    result["throughput"] = _throughput(llm, lambda c, s: _prompts(spec, tokenizer, c, s), spec)
    shutdown(llm)
    if spec["kv_blocks"]:
        llm = _engine(spec, cfg, spec["kv_blocks"])
        prompts = _prompts(spec, llm.get_tokenizer(), spec["resident_requests"], 500_000)
        result["residency"] = measure_residency(llm, prompts, spec["resident_max_tokens"],
                                                   spec["resident_max_steps"], 4)
        result["residency"].pop("trace", None)
        shutdown(llm)
    return result


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _rates(tp: dict[str, Any], n: int, w: Workload, submitted: float | None = None) -> dict[str, Any]:
    """req/s and prompt tok/s (prompt tokens as submitted, before pruning: ``submitted`` for the
    limit, whose prompts hold only the kept tokens), prompt tokens submitted and kept."""
    prompt = statistics.mean(tp["prompt_tokens"])  # as the engine reports them (stats: before)
    if tp["kept_image_tokens"]:  # pruned in the engine: kept = submitted - pruned image tokens
        kept = prompt - w.image_tokens + statistics.mean(tp["kept_image_tokens"])
    else:
        kept = prompt
    submitted = prompt if submitted is None else submitted
    req_s = [n / t for t in tp["times_s"]]
    return {"req_s": summary(req_s), "prompt_tok_s": summary([r * submitted for r in req_s]),
            "prompt_tokens": submitted, "kept_prompt_tokens": kept}


BLOCK = 128  # vLLM's CPU KV block size


def resident_max_len(w: Workload, max_tokens: int) -> int:
    """The residency engine's max_model_len: a request's prompt (image + ~60 text tokens) and its
    output, in whole blocks."""
    return BLOCK * -(-(w.image_tokens + 64 + max_tokens) // BLOCK)


def kv_blocks_for(w: Workload, max_tokens: int) -> int:
    """A KV cache that holds 4 vanilla requests at their longest (+ vLLM's null block)."""
    return 4 * resident_max_len(w, max_tokens) // BLOCK + 1


def run_offline(w: Workload, args, log) -> dict[str, Any]:
    from vllm_glimpse.testing.glimpse_bench import bench_glimpse_checkpoint

    family_model = model_path(w.family)
    checkpoint = (str(bench_glimpse_checkpoint(w.family)) if "glimpse" in w.methods else None)

    def run(cfg: Config) -> dict[str, Any]:
        spec = dict(config=asdict(cfg), model=family_model, family=w.family, side=w.side,
                    checkpoint=checkpoint, requests=args.requests, repeats=args.repeats,
                    max_tokens=args.max_tokens, dtype=args.dtype, held_requests=args.held_requests,
                    kv_blocks=kv_blocks_for(w, args.resident_max_tokens),
                    resident_max_len=resident_max_len(w, args.resident_max_tokens),
                    resident_requests=args.resident_requests,
                    resident_max_tokens=args.resident_max_tokens, resident_max_steps=400)
        env = worker_env(args.threads, KV_CACHE_GIB, ENGINE_ENV,
                         plugin=cfg.kind in ("visionzip", "glimpse"))
        log(f"[{w.name}] {cfg.name} ...")
        result, reason, wall, stderr = run_worker(__file__, spec, env, args.timeout)
        if result is None:
            if args.verbose:
                print(stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"[{w.name}] {cfg.name} failed: {reason}")
        log(f"[{w.name}] {cfg.name} done in {wall:.0f} s")
        result["wall_s"] = wall
        return result

    configs = configs_for(w)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # --jobs > 1: not measurements
        rows = dict(zip((c.name for c in configs), pool.map(run, configs)))
    return summarize_offline(w, rows, args.requests)


def summarize_offline(w: Workload, rows: dict[str, Any], n: int) -> dict[str, Any]:
    base = _rates(rows["vanilla"]["throughput"], n, w)
    lines = []

    def line(name, tp, held=None, residency=None, submitted=None):
        rates = _rates(tp, n, w, submitted)
        entry = {"config": name, **rates, "req_s_ratio": ratio(rates["req_s"], base["req_s"]),
                 "prompt_tok_s_ratio": ratio(rates["prompt_tok_s"], base["prompt_tok_s"])}
        if held is not None:
            entry["kv_blocks_per_req"] = held["held_blocks_per_req"]
        if residency is not None:
            entry["max_resident"] = residency["max_resident"]
            entry["resident_capped"] = residency["capped"]
        lines.append(entry)

    for name, r in rows.items():
        if name == "limit":
            for method, tp in r["throughput"].items():
                line(f"limit-{method}", tp, submitted=base["prompt_tokens"])
        else:
            line(name, r["throughput"], r.get("held"), r.get("residency"))
    v = next(e for e in lines if e["config"] == "vanilla")
    for e in lines:
        if "kv_blocks_per_req" in e:
            e["kv_blocks_ratio"] = e["kv_blocks_per_req"] / v["kv_blocks_per_req"]
        if "max_resident" in e and v.get("max_resident"):
            e["max_resident_ratio"] = e["max_resident"] / v["max_resident"]
        limit = next((x for x in lines if x["config"] == f"limit-{e['config']}"), None)
        if limit is not None:
            e["of_limit"] = e["req_s"]["median"] / limit["req_s"]["median"]
    return {"workload": asdict(w), "model": model_path(w.family), "lines": lines, "raw": rows}


def _level(result: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """One concurrency level of the report, from ``vllm bench serve``'s result JSON."""
    return {"concurrency": concurrency, "requests": result["completed"],
            "wall_s": result["duration"], "request_throughput": result["request_throughput"],
            "output_throughput": result["output_throughput"],
            "ttft_ms_median": result["median_ttft_ms"], "ttft_ms_p90": result["p90_ttft_ms"],
            "itl_ms_median": result["median_itl_ms"], "itl_ms_p90": result["p90_itl_ms"],
            "e2e_ms_median": result["median_e2el_ms"],
            "prompt_tokens_mean": result["total_input_tokens"] / result["completed"]}


def run_online(w: Workload, args, log) -> dict[str, Any]:
    from vllm_glimpse.testing.glimpse_bench import bench_glimpse_checkpoint

    # vLLM's serving defaults otherwise (compiled, prefix caching, chunked prefill, processor
    # cache): random-mm sends a new image per request, so no cache flatters any configuration.
    common = ["--dtype", args.dtype, "--max-model-len", str(MAX_MODEL_LEN),
              "--limit-mm-per-prompt", '{"image": 1}']
    if w.family == "qwen2_5_vl":
        common += ["--mm-processor-kwargs", json.dumps({"max_pixels": w.side ** 2})]

    def run(cfg: Config) -> dict[str, Any]:
        serve_args = list(common)
        env = worker_env(args.threads, KV_CACHE_GIB, {}, plugin=cfg.kind != "vanilla")
        if cfg.kind == "visionzip":
            serve_args += ["--plugin", "visionzip"] + [
                a for k, v in cfg.knobs.items() for a in (f"--visionzip-{k.replace('_', '-')}", str(v))]
        elif cfg.kind == "glimpse":
            serve_args += ["--plugin", "glimpse", "--glimpse-checkpoint",
                           str(bench_glimpse_checkpoint(w.family)),
                           "--glimpse-fixed-ratio", str(GLIMPSE_RATIO)]
        log(f"[{w.name}] online {cfg.name} ...")
        model = model_path(w.family)
        out = Path(args.out) / f"serve-{w.name}-{cfg.name}"
        with serve(model, serve_args, env, f"{out}.log") as (url, start_s):
            before = scrape_metrics(url)
            levels = [_level(bench_serve(url, model, concurrency=c, num_prompts=args.online_requests,
                                         image_side=w.side, max_tokens=args.online_max_tokens,
                                         seed=700 + c, out_dir=out), c)
                      for c in args.concurrency]
            delta = metrics_delta(before, scrape_metrics(url))
        log(f"[{w.name}] online {cfg.name} done in {start_s:.0f} s + sweep")
        return {"levels": levels, "server_start_s": start_s, "metrics_delta": delta}

    configs = [c for c in configs_for(w) if c.kind != "limit"]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        out = dict(zip((c.name for c in configs), pool.map(run, configs)))
    v = {lv["concurrency"]: lv for lv in out["vanilla"]["levels"]}
    for name, res in out.items():
        for lv in res["levels"]:
            base = v[lv["concurrency"]]
            for key in ("ttft_ms_median", "itl_ms_median", "request_throughput"):
                lv[f"{key}_ratio"] = lv[key] / base[key] if base[key] else None
    return out


# ---- report --------------------------------------------------------------------------------


def print_offline(res: dict[str, Any]) -> None:
    w = res["workload"]
    print(f"\n{w['name']}: {w['image_tokens']} image tokens per request ({res['model']})")
    print(f"{'config':<18}{'kept tok':>11}{'req/s (min-max)':>26}{'x vanilla':>22}"
          f"{'of limit':>9}{'KV blk/req':>11}{'x':>6}{'resident':>9}{'x':>6}")
    for e in res["lines"]:
        r, q = e["req_s"], e["req_s_ratio"]
        print(f"{e['config']:<18}{e['kept_prompt_tokens']:>11.1f}"
              f"{r['median']:>10.3f} ({r['min']:.3f}-{r['max']:.3f})"
              f"{q['median']:>8.2f} ({q['min']:.2f}-{q['max']:.2f})"
              f"{fmt(e.get('of_limit'), '.2f'):>9}{fmt(e.get('kv_blocks_per_req'), '.1f'):>11}"
              f"{fmt(e.get('kv_blocks_ratio'), '.2f'):>6}"
              f"{str(e.get('max_resident', '-')) + ('*' if e.get('resident_capped') else ''):>9}"
              f"{fmt(e.get('max_resident_ratio'), '.2f'):>6}")


def print_online(name: str, res: dict[str, Any]) -> None:
    print(f"\n{name}: online, streaming chat completions")
    print(f"{'config':<12}{'conc':>5}{'req/s':>8}{'x':>6}{'TTFT ms med':>12}{'p90':>8}{'x':>6}"
          f"{'ITL ms med':>11}{'p90':>8}{'x':>6}")
    for cfg, r in res.items():
        for lv in r["levels"]:
            print(f"{cfg:<12}{lv['concurrency']:>5}{lv['request_throughput']:>8.3f}"
                  f"{fmt(lv['request_throughput_ratio'], '.2f'):>6}"
                  f"{lv['ttft_ms_median']:>12.0f}{lv['ttft_ms_p90']:>8.0f}"
                  f"{fmt(lv['ttft_ms_median_ratio'], '.2f'):>6}{lv['itl_ms_median']:>11.1f}"
                  f"{lv['itl_ms_p90']:>8.1f}{fmt(lv['itl_ms_median_ratio'], '.2f'):>6}")


def render_markdown(report: dict[str, Any]) -> str:
    """The report's tables in Markdown (``results.md``; docs/benchmarks.md shows them)."""
    def rng(q, spec=".2f"):
        return f"{q['median']:{spec}} ({q['min']:{spec}}–{q['max']:{spec}})"

    lines = []
    for o in report["offline"]:
        w = o["workload"]
        lines += [f"**{w['name']}** ({w['image_tokens']:,} image tokens per request)", "",
                  "| config | prompt tok/req → kept | req/s | × vanilla | of limit | prompt tok/s × vanilla "
                  "| KV blocks/req | × vanilla | max resident | × vanilla |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in o["lines"]:
            capped = "*" if e.get("resident_capped") else ""
            lines.append(
                f"| {e['config']} | {e['prompt_tokens']:,.1f} → {e['kept_prompt_tokens']:,.1f} | "
                f"{rng(e['req_s'], '.3f')} | "
                f"{rng(e['req_s_ratio'])} | {fmt(e.get('of_limit'), '.2f')} | "
                f"{e['prompt_tok_s_ratio']['median']:.2f} | {fmt(e.get('kv_blocks_per_req'), '.1f')} | "
                f"{fmt(e.get('kv_blocks_ratio'), '.2f')} | {e.get('max_resident', '-')}{capped} | "
                f"{fmt(e.get('max_resident_ratio'), '.2f')} |")
        lines.append("")
    for name, res in report["online"].items():
        lines += [f"**{name}, online** (streaming chat completions against `vllm serve`)", "",
                  "| config | concurrency | req/s | × vanilla | TTFT median (p90) ms | × vanilla "
                  "| ITL median (p90) ms | × vanilla |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for cfg, r in res.items():
            for lv in r["levels"]:
                lines.append(
                    f"| {cfg} | {lv['concurrency']} | {lv['request_throughput']:.3f} | "
                    f"{fmt(lv['request_throughput_ratio'], '.2f')} | {lv['ttft_ms_median']:.0f} "
                    f"({lv['ttft_ms_p90']:.0f}) | {fmt(lv['ttft_ms_median_ratio'], '.2f')} | "
                    f"{lv['itl_ms_median']:.1f} ({lv['itl_ms_p90']:.1f}) | "
                    f"{fmt(lv['itl_ms_median_ratio'], '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    offline = report["offline"]
    if offline:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        names = [o["workload"]["name"] for o in offline]
        configs = sorted({e["config"] for o in offline for e in o["lines"]},
                         key=lambda c: ("vanilla", "visionzip", "glimpse", "limit-visionzip",
                                        "limit-glimpse").index(c))
        width = 0.8 / len(configs)
        for j, cfg in enumerate(configs):
            xs, med, lo, hi, kv, res = [], [], [], [], [], []
            for i, o in enumerate(offline):
                e = next((e for e in o["lines"] if e["config"] == cfg), None)
                if e is None:
                    continue
                q = e["req_s_ratio"]
                xs.append(i + (j - len(configs) / 2 + 0.5) * width)
                med.append(q["median"])
                lo.append(q["median"] - q["min"])
                hi.append(q["max"] - q["median"])
                kv.append(e.get("kv_blocks_ratio"))
                res.append(e.get("max_resident_ratio"))
            axes[0].bar(xs, med, width, yerr=[lo, hi], capsize=2, label=cfg)
            pts = [(x, k) for x, k in zip(xs, kv) if k is not None]
            if pts:
                axes[1].bar(*zip(*pts), width, label=cfg)
            pts = [(x, r) for x, r in zip(xs, res) if r is not None]
            if pts:
                axes[2].bar(*zip(*pts), width, label=cfg)
        for ax, title in zip(axes, ("offline requests/s, x vanilla (min-max over repeats)",
                                    "KV blocks held per request after prefill, x vanilla",
                                    "most requests resident in a small KV cache, x vanilla")):
            ax.set_xticks(range(len(names)), names, rotation=20)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_title(title, fontsize=9)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "offline.png", dpi=110)
        plt.close(fig)
        files.append(str(out / "offline.png"))
    online = report["online"]
    if online:
        fig, axes = plt.subplots(len(online), 2, figsize=(11, 3.6 * len(online)), squeeze=False)
        for row, (name, res) in enumerate(online.items()):
            for cfg, r in res.items():
                conc = [lv["concurrency"] for lv in r["levels"]]
                axes[row][0].plot(conc, [lv["ttft_ms_median"] for lv in r["levels"]], "o-", label=cfg)
                axes[row][1].plot(conc, [lv["itl_ms_median"] for lv in r["levels"]], "o-", label=cfg)
            axes[row][0].set_title(f"{name}: time to first token, median (ms)", fontsize=9)
            axes[row][1].set_title(f"{name}: inter-token latency, median (ms)", fontsize=9)
            for ax in axes[row]:
                ax.set_xlabel("concurrent requests")
                ax.set_xscale("log", base=2)
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "online.png", dpi=110)
        plt.close(fig)
        files.append(str(out / "online.png"))
    return files


def _models_facts(workloads: list[Workload]) -> dict[str, Any]:
    from vllm_glimpse.testing.bench_models import parameter_counts

    out = {}
    for w in workloads:
        if w.family in out:
            continue
        path = model_path(w.family)
        counts = parameter_counts(w.family, path) if w.family != "llava_next" else None
        cfg = json.loads(Path(path, "config.json").read_text())
        text = cfg.get("text_config") or cfg
        out[w.family] = {"path": path, "parameters": counts,
                         "llm": {k: text.get(k) for k in ("hidden_size", "num_hidden_layers",
                                                          "num_attention_heads",
                                                          "num_key_value_heads")}}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=None, help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--online", default=None,
                   help="workloads for the online sweep (default: qwen-896; 'none' to skip)")
    p.add_argument("--out", default="benchmarks/results/suite")
    p.add_argument("--requests", type=int, default=8, help="N requests per timed batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--held-requests", type=int, default=4)
    p.add_argument("--resident-requests", type=int, default=32)
    p.add_argument("--resident-max-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--online-requests", type=int, default=16)
    p.add_argument("--online-max-tokens", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per engine")
    p.add_argument("--jobs", type=int, default=1,
                   help="configurations run at once (> 1 shares the CPU: a smoke check, not "
                        "measurements; --quick uses 2)")
    p.add_argument("--quick", action="store_true", help="smoke check (minutes; not measurements)")
    p.add_argument("--timeout", type=float, default=5400)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--render", default=None, metavar="REPORT",
                   help="recompute the tables, results.md and plots of a report.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.render:
        path = Path(args.render)
        report = json.loads(path.read_text())
        n = report["settings"]["requests"]
        report["offline"] = [summarize_offline(Workload(**o["workload"]), o["raw"], n)
                             for o in report["offline"]]
        for o in report["offline"]:
            print_offline(o)
        for name, res in report["online"].items():
            print_online(name, res)
        report["plots"] = plot(report, path.parent)
        write_json(path, report, indent=1)
        (path.parent / "results.md").write_text(render_markdown(report))
        return 0

    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(args.worker_out).write_text(json.dumps(worker(spec)))
        return 0

    if args.quick:
        args.requests, args.repeats, args.max_tokens = 2, 2, 4
        args.held_requests, args.resident_requests, args.resident_max_tokens = 2, 6, 8
        args.online_requests, args.online_max_tokens, args.concurrency = 4, 4, "1,2"
        args.jobs = max(args.jobs, 2)
    names = (args.workloads.split(",") if args.workloads
             else list(QUICK_WORKLOADS if args.quick else WORKLOADS))
    online = ([] if args.online == "none" else
              (args.online.split(",") if args.online else (["llava-336"] if args.quick else ["qwen-896"])))
    unknown = sorted(set(names + online) - set(WORKLOADS))
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    steps = sum(len(configs_for(WORKLOADS[n])) for n in names) + sum(
        len(configs_for(WORKLOADS[n])) - 1 for n in online)
    bar = tqdm(total=steps, desc="suite", disable=args.no_progress, file=sys.stderr)
    t0 = time.time()

    def log(msg: str) -> None:
        bar.write(f"{time.time() - t0:7.0f}s {msg}", file=sys.stderr)
        if " done in " in msg:  # a configuration finished (offline or online)
            bar.update(1)

    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/suite.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "settings": {k: v for k, v in vars(args).items()
                                             if k not in ("worker", "worker_out")},
        "engine_args": ENGINE_ARGS, "models": _models_facts([WORKLOADS[n] for n in names + online]),
        "offline": [], "online": {},
    }
    for name in names:
        res = run_offline(WORKLOADS[name], args, log)
        report["offline"].append(res)
        print_offline(res)
        write_json(out / "report.json", report, indent=1)
    for name in online:
        res = run_online(WORKLOADS[name], args, log)
        report["online"][name] = res
        print_online(name, res)
        write_json(out / "report.json", report, indent=1)
    bar.close()
    report["plots"] = plot(report, out)
    report["total_s"] = time.time() - t0
    write_json(out / "report.json", report, indent=1)
    (out / "results.md").write_text(render_markdown(report))
    print(f"\nreport: {out / 'report.json'}; plots: {', '.join(report['plots'])}; "
          f"{report['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
