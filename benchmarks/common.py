"""What the benchmark scripts share: one configuration per process, engine measurements, the
online server, statistics, formatting and JSON.

* **One configuration per process.** A script runs ``<script> --worker SPEC --worker-out OUT``
  in a fresh interpreter (:func:`run_worker`) with :func:`worker_env`, so that vanilla vLLM runs
  without the plugin loaded at all (``VLLM_PLUGINS=""``) and every engine starts from a clean
  process with the same thread count. :data:`ENGINE_ENV` puts the engine core and the model
  runner in that process (no engine-core or worker process: on a 2-core machine vLLM's default
  layout reserves one core for the engine core's loop and costs ~50 s per engine start), so the
  scheduler can be read directly (:func:`scheduler_of`).
* **Workloads.** :func:`image_prompts` (one synthetic image or precomputed embeddings and a
  question per request).
* **Engine measurements.** :func:`timed_generate` (one timed ``LLM.generate``),
  :func:`measure_held` (KV blocks each request holds once its prefill is done),
  :func:`measure_residency` (most requests resident at once in a small KV cache),
  :func:`check_vanilla` (no plugin class registered in a vanilla engine).
* **Online.** :func:`serve` runs ``vllm serve`` on loopback; :func:`bench_serve` measures it with
  vLLM's own ``vllm bench serve`` (streaming chat completions with images, time to first token,
  inter-token latency); :func:`scrape_metrics` / :func:`metrics_delta` read the plugin's
  Prometheus counters around it, which ``vllm bench serve`` does not report.
* **Numbers.** :func:`summary` (median, min, max), :func:`ratio` (of summaries, with the worst
  and best pairing), :func:`fmt`, :func:`write_json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Environment of every benchmark engine: engine core and model runner in the worker's process
#: (with ``distributed_executor_backend="uni"``), no core reserved for an engine-core loop.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}

#: Questions the synthetic requests cycle through.
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

# --------------------------------------------------------------------------------------------
# One configuration per process
# --------------------------------------------------------------------------------------------


def worker_env(threads: int, kv_cache_gib: int, engine_env: dict[str, str],
               plugin: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    for k, v in engine_env.items():
        env.setdefault(k, v)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not plugin:
        env["VLLM_PLUGINS"] = ""  # vanilla vLLM: the plugin is not loaded at all
    return env


def run_worker(script: str, spec: dict[str, Any], env: dict[str, str],
               timeout: float) -> tuple[dict[str, Any] | None, str, float, str]:
    """(result or None, failure reason, wall seconds, stderr) of ``script``'s worker on ``spec``."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(script).resolve()), "--worker", str(spec_file),
               "--worker-out", str(out_file)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO,
                              timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode == 0 and out_file.exists():
            return json.loads(out_file.read_text()), "", wall, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", ln)]
    reason = next((ln for ln in reversed(lines) if "PruningSettingsError" in ln),
                  errors[-1] if errors else (lines[-1] if lines else f"exit code {proc.returncode}"))
    return None, reason.strip(), wall, proc.stderr


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


def image_prompts(tokenizer, family: str, count: int, seed0: int, size: tuple[int, int], *,
                  questions: tuple[str, ...] = QUESTIONS, embed_tokens: int | None = None,
                  hidden: int = 0, dtype=None, given_embeds: list | None = None) -> list[dict]:
    """``count`` prompts for ``LLM.generate``, request i: the model's chat template around one
    image and ``questions[i % len]``. The image is a distinct synthetic picture of ``size``
    (kind cycling, seed ``seed0 + i``); or, for the limit runs, precomputed embeddings: random
    ones of ``embed_tokens`` rows (seed ``seed0 + i``) or the i-th of ``given_embeds``
    (``[tokens, hidden]`` each). ``family`` picks the embeddings' input layout (``qwen...``:
    with an M-RoPE grid)."""
    from vllm_glimpse.testing.workloads import (
        IMAGE_KINDS,
        chat_prompt,
        image_embeds_input,
        random_image_embeds,
        synthetic_image,
    )

    prompts = []
    for i in range(count):
        text = chat_prompt(tokenizer, questions[i % len(questions)], 1)
        if given_embeds is not None:
            image: Any = image_embeds_input(family, given_embeds[i])
        elif embed_tokens is None:
            image = synthetic_image(IMAGE_KINDS[i % len(IMAGE_KINDS)], size[0], size[1], seed0 + i)
        else:
            image = image_embeds_input(
                family, random_image_embeds(embed_tokens, hidden, dtype, seed0 + i))
        prompts.append({"prompt": text, "multi_modal_data": {"image": image}})
    return prompts


def text_prompts(tokenizer, count: int, seed0: int, *,
                 questions: tuple[str, ...] = QUESTIONS) -> list[dict]:
    """``count`` text-only prompts, each distinct from its first words on (so that no prefix
    cache hands back a whole block of another request beyond the chat template's few tokens)."""
    from vllm_glimpse.testing.workloads import chat_prompt

    return [{"prompt": chat_prompt(tokenizer, f"Request {seed0 + i}, in one paragraph: "
                                              f"{questions[i % len(questions)]}", 0)}
            for i in range(count)]


# --------------------------------------------------------------------------------------------
# Engine measurements (in the worker's process)
# --------------------------------------------------------------------------------------------


def scheduler_of(llm):
    """The engine core's scheduler (the engine core runs in this process: :data:`ENGINE_ENV`)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def check_vanilla(llm) -> None:
    """Stop if any of the plugin's model classes is registered: vanilla must not run our code."""
    from vllm import ModelRegistry

    from vllm_glimpse.settings import VARIANTS

    leaked = set(ModelRegistry.get_supported_archs()) & {v.arch for v in VARIANTS.values()}
    if leaked:
        raise SystemExit(f"vanilla run has plugin architectures registered: {leaked}")


def timed_generate(llm, prompts, params) -> tuple[list, dict[str, float]]:
    """One timed ``LLM.generate`` (prompts built before the clock): its outputs, and its wall
    seconds, process CPU seconds and mean 1-minute load average. Every request must produce
    ``params.max_tokens`` tokens (``ignore_eos``)."""
    load0, cpu0 = os.getloadavg()[0], time.process_time()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    timing = dict(seconds=time.perf_counter() - start, process_cpu_s=time.process_time() - cpu0,
                  loadavg_1min=(load0 + os.getloadavg()[0]) / 2)
    if any(len(o.outputs[0].token_ids) != params.max_tokens for o in outs):
        raise SystemExit("a request produced fewer than max_tokens tokens")
    return outs, timing


def _abort_all(llm, ids: list[str]) -> None:
    engine = llm.llm_engine
    engine.abort_request(ids, internal=True)
    for _ in range(8):  # let the engine core process the aborts
        if not engine.has_unfinished_requests():
            break
        engine.step()


def measure_held(llm, prompts, max_tokens: int) -> dict[str, Any]:
    """KV blocks held by each request once every request has finished its prefill."""
    from vllm import SamplingParams

    engine, sched = llm.llm_engine, scheduler_of(llm)
    pool = sched.kv_cache_manager.block_pool
    block_size = sched.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    free0 = pool.get_num_free_blocks()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(f"held-{i}", p, params) for i, p in enumerate(prompts)]
    steps, t0 = 0, time.perf_counter()
    while True:
        engine.step()
        steps += 1
        running = list(sched.running)
        if (len(running) == len(ids)
                and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)):
            break
        if steps > 20 * len(ids) + 20 or not engine.has_unfinished_requests():
            raise SystemExit(f"held-blocks: requests did not all finish prefill in {steps} steps "
                             f"({len(running)} running, {len(sched.waiting)} waiting)")
    held = free0 - pool.get_num_free_blocks()
    per_req_blocks = [len(sched.kv_cache_manager.coordinator.single_type_managers[0]
                          .req_to_blocks.get(r.request_id, [])) for r in running]
    out = dict(requests=len(ids), steps=steps, seconds=time.perf_counter() - t0,
               block_size=block_size, free_before=free0, held_blocks=held,
               held_blocks_per_req=held / len(ids), blocks_per_req=per_req_blocks,
               computed_tokens=[r.num_computed_tokens for r in running],
               prompt_tokens_now=[r.num_prompt_tokens for r in running])
    _abort_all(llm, ids)
    out["pool_whole_after_abort"] = pool.get_num_free_blocks() == free0
    return out


def measure_residency(llm, prompts, max_tokens: int, max_steps: int,
                      extra_steps: int) -> dict[str, Any]:
    """Most requests decoding at once (whole prompt in the KV cache), under the engine's (small)
    KV cache. Stepping stops when every request is resident at once (the count is then capped by
    the request count), ``extra_steps`` after the first request finishes (by then admission is
    bound by the KV cache), or after ``max_steps``; the rest is aborted."""
    from vllm import SamplingParams

    engine, sched = llm.llm_engine, scheduler_of(llm)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t_add = time.perf_counter()
    ids = [engine.add_request(f"res-{i}", p, params) for i, p in enumerate(prompts)]
    t_add = time.perf_counter() - t_add
    trace: list[list[int]] = []  # per step: running, waiting, blocks in use
    preemptions: dict[str, int] = {}
    finished, first_finish, stop, steps = 0, None, "all requests finished", 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        # Resident: the whole prompt is in the cache (decoding). A partial prefill (vanilla's
        # chunked prefill admits many) holds only part of its KV and is not counted.
        running = sum(1 for r in sched.running if r.num_computed_tokens >= r.num_prompt_tokens)
        trace.append([running, len(sched.waiting), free0 - pool.get_num_free_blocks()])
        for r in list(sched.running) + list(sched.waiting):
            if getattr(r, "num_preemptions", 0):
                preemptions[r.request_id] = max(preemptions.get(r.request_id, 0), r.num_preemptions)
        finished += sum(1 for o in outs if o.finished)
        if finished and first_finish is None:
            first_finish = steps
        if running == len(ids):
            stop = "every request resident at once (the count is capped by the request count)"
            break
        if first_finish is not None and steps >= first_finish + extra_steps:
            stop = f"{extra_steps} steps after the first request finished"
            break
        if steps >= max_steps:
            stop = f"step limit {max_steps}"
            break
    seconds = time.perf_counter() - t0
    _abort_all(llm, ids)
    counts = [t[0] for t in trace]
    return dict(requests=len(ids), max_tokens=max_tokens, num_blocks=free0,
                max_resident=max(counts) if counts else 0,
                median_resident_2nd_half=(statistics.median(counts[len(counts) // 2:])
                                          if counts else 0),
                capped=bool(counts) and max(counts) == len(ids),
                steps=steps, first_finish_step=first_finish, stop=stop, seconds=seconds,
                add_seconds=t_add, preempted_requests=len(preemptions),
                preemptions=sum(preemptions.values()), max_blocks_in_use=max(t[2] for t in trace),
                trace=trace, pool_whole_after_abort=pool.get_num_free_blocks() == free0)


# --------------------------------------------------------------------------------------------
# Online: vllm serve on loopback, measured by vllm bench serve
# --------------------------------------------------------------------------------------------

#: Samples of the plugin's Prometheus metrics whose deltas the online runs report.
METRIC_SAMPLES = (
    "vllm_glimpse:image_tokens_kept_ratio_count",
    "vllm_glimpse:image_tokens_kept_ratio_sum",
    "vllm_glimpse:image_tokens_saved_total",
    "vllm_glimpse:image_tokens_before_total",
)


def _vllm_executable() -> str:
    exe = Path(sys.executable).with_name("vllm")
    if exe.exists():
        return str(exe)
    found = shutil.which("vllm")
    if found is None:
        raise RuntimeError(f"no `vllm` executable next to {sys.executable} or on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log_path: Path, chars: int = 4000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"(log {log_path} unreadable: {e})"


def _wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode} before it was ready; "
                               f"log {log_path}:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"vllm serve not ready after {timeout:.0f} s; "
                               f"log {log_path}:\n{_log_tail(log_path)}")
        time.sleep(1.0)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        # The server runs in its own session: take its engine-core/worker processes along.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.wait()


@contextlib.contextmanager
def serve(model: str, serve_args: list[str], env: dict[str, str], log_path: str | os.PathLike,
          ready_timeout: float = 900.0):
    """``vllm serve model *serve_args`` on a free loopback port (``env`` over this process's
    environment; ``VLLM_CPU_KVCACHE_SPACE`` 2 GiB unless set; its own engine-core and worker
    processes, as users run it), output to ``log_path``. Yields ``(base_url, start_seconds)``
    once ``/health`` answers; stops the server on exit, also on errors."""
    server_env = {**os.environ, **env}
    server_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    server_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    port = _free_port()
    cmd = [_vllm_executable(), "serve", str(model), *map(str, serve_args),
           "--host", "127.0.0.1", "--port", str(port)]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=server_env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_ready(proc, port, log_path, ready_timeout)
        yield f"http://127.0.0.1:{port}", time.perf_counter() - t0
    finally:
        _stop(proc)


def bench_serve(base_url: str, model: str, *, concurrency: int, num_prompts: int,
                image_side: int, max_tokens: int, seed: int, out_dir: str | os.PathLike,
                timeout: float = 3600.0) -> dict[str, Any]:
    """One ``vllm bench serve`` level against the server at ``base_url``: ``num_prompts``
    streaming chat completions, each one random ``image_side``² image (vLLM's ``random-mm``
    dataset: a new image per request, so no cache helps) and a short random text, greedy,
    ``max_tokens`` tokens (``ignore_eos``), at most ``concurrency`` in flight. It first sends
    one test request of its own (not measured). Returns its result JSON."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench-c{concurrency}.json"
    cmd = [_vllm_executable(), "bench", "serve", "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--base-url", base_url, "--model", str(model),
           "--dataset-name", "random-mm", "--random-mm-base-items-per-request", "1",
           "--random-mm-num-mm-items-range-ratio", "0",
           "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
           "--random-mm-bucket-config", f"{{({image_side}, {image_side}, 1): 1.0}}",
           "--random-input-len", "16", "--random-range-ratio", "0",
           "--random-output-len", str(max_tokens), "--ignore-eos",
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
           "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,90",
           "--seed", str(seed), "--disable-tqdm",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"})
    if proc.returncode != 0 or not (out_dir / name).exists():
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads((out_dir / name).read_text())
    if result.get("completed") != num_prompts:
        raise RuntimeError(f"vllm bench serve completed {result.get('completed')} of "
                           f"{num_prompts} requests")
    return result


def scrape_metrics(base_url: str) -> dict[tuple[str, str], float]:
    """{(sample name, method label): value} of the plugin's samples on ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in METRIC_SAMPLES:
                key = (sample.name, sample.labels.get("method", ""))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def metrics_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """{method: {sample name: after - before, ..., "kept_ratio_mean": sum / count}}."""
    delta: dict[str, dict[str, float]] = {}
    for name, method in sorted(set(before) | set(after)):
        delta.setdefault(method, {})[name] = (after.get((name, method), 0.0)
                                              - before.get((name, method), 0.0))
    for values in delta.values():
        count = values.get("vllm_glimpse:image_tokens_kept_ratio_count", 0.0)
        if count:
            values["kept_ratio_mean"] = (values.get("vllm_glimpse:image_tokens_kept_ratio_sum", 0.0)
                                         / count)
    return delta


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio(x: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """``x / base`` of two summaries: the ratio of the medians, and the worst and best pairing
    of their extremes."""
    return {"median": x["median"] / base["median"], "min": x["min"] / base["max"],
            "max": x["max"] / base["min"]}


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent))
