"""Online serving benchmark: a real ``vllm serve`` on loopback, a concurrency sweep of streamed
OpenAI chat completions with images, time to first token and inter-token latency per level.

:func:`serve_sweep` is the part of the benchmark suite that measures what users of
``vllm serve`` see. It starts the server (its own engine-core and worker processes, as users run
it), waits for ``/health``, sends one warm-up request (not measured), then for each concurrency
``c`` sends ``requests_per_level`` streamed requests with at most ``c`` in flight (greedy,
``max_tokens`` tokens, ``ignore_eos``), and stops the server, also on errors.

Per request: TTFT = time from sending the request to the first chunk that carries a token (the
role-only chunk vLLM sends first does not count), ITLs = gaps between successive token chunks,
end-to-end latency, prompt and completion tokens (from the usage chunk). vLLM streams one token
per chunk, but merges a request's pending tokens into one chunk when the client falls behind; the
ITL is the gap between chunks (``tokens_per_chunk_mean`` shows how often that happened). The
requests ask for ``return_token_ids`` so that a token whose text is empty (a special token, an
incomplete UTF-8 sequence) still shows as a token chunk.

``/metrics`` is scraped after the warm-up and after the last level: the deltas of the plugin's
pruning metrics (``vllm_glimpse:image_tokens_*``) per ``method`` label cover exactly the measured
requests; a server without the plugin has none (empty dict).

Requests reuse ``messages`` across levels (and the warm-up reuses ``messages[0]``): pass
``--no-enable-prefix-caching`` (and ``--mm-processor-cache-gb 0``) in ``serve_args`` when repeated
prompts must not hit vLLM's caches.

Manual check (prints the result as JSON; ``VLLM_PLUGINS=""`` or ``--vanilla`` for vLLM without
the plugin)::

    .venv/bin/python benchmarks/_online.py MODEL --concurrency 1,2 --requests 4 --max-tokens 4 \\
        [--serve-arg=--dtype --serve-arg=float32 ...] [--serve-arg=--plugin --serve-arg=visionzip]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: Samples of the plugin's Prometheus metrics whose deltas :func:`serve_sweep` reports.
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


def _scrape_metrics(port: int) -> dict[tuple[str, str], float]:
    """{(sample name, method label): value} of the plugin's samples on ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in METRIC_SAMPLES:
                key = (sample.name, sample.labels.get("method", ""))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _metrics_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """{method: {sample name: after - before, ..., "kept_ratio_mean": sum / count}}."""
    delta: dict[str, dict[str, float]] = {}
    for name, method in sorted(set(before) | set(after)):
        delta.setdefault(method, {})[name] = after.get((name, method), 0.0) - before.get((name, method), 0.0)
    for values in delta.values():
        count = values.get("vllm_glimpse:image_tokens_kept_ratio_count", 0.0)
        if count:
            values["kept_ratio_mean"] = values.get("vllm_glimpse:image_tokens_kept_ratio_sum", 0.0) / count
    return delta


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


async def _one_request(client, model_id: str, messages: list[dict], max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model_id, messages=messages, stream=True, temperature=0.0, max_tokens=max_tokens,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True})
    token_times: list[float] = []
    streamed_tokens = 0
    usage = None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            token_ids = (choice.model_extra or {}).get("token_ids") or []
            content = choice.delta.content if choice.delta is not None else None
            if token_ids or content:
                token_times.append(now)
                streamed_tokens += len(token_ids)
    t_end = time.perf_counter()
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    if usage.completion_tokens != max_tokens or not token_times:
        raise RuntimeError(f"a request produced {usage.completion_tokens} completion tokens "
                           f"({len(token_times)} token chunks), expected {max_tokens}")
    return {
        "ttft_s": token_times[0] - t0,
        "itls_s": [b - a for a, b in zip(token_times, token_times[1:])],
        "e2e_s": t_end - t0,
        "chunks": len(token_times),
        "streamed_tokens": streamed_tokens,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


async def _level(client, model_id: str, messages: list[list[dict]], concurrency: int, n: int,
                 max_tokens: int, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=n, desc=f"concurrency {concurrency}", unit="req", file=sys.stderr,
               disable=not progress, leave=True)

    async def limited(i: int) -> dict[str, Any]:
        async with sem:
            result = await _one_request(client, model_id, messages[i % len(messages)], max_tokens)
        bar.update(1)
        return result

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(limited(i) for i in range(n)))
    finally:
        bar.close()
    wall = time.perf_counter() - t0

    ttfts = [r["ttft_s"] * 1e3 for r in results]
    itls = [x * 1e3 for r in results for x in r["itls_s"]]
    e2es = [r["e2e_s"] * 1e3 for r in results]
    out_tokens = sum(r["completion_tokens"] for r in results)
    chunks = sum(r["chunks"] for r in results)
    streamed = sum(r["streamed_tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": n,
        "wall_s": wall,
        "request_throughput": n / wall,
        "output_throughput": out_tokens / wall,
        "ttft_ms_median": _pct(ttfts, 50),
        "ttft_ms_p90": _pct(ttfts, 90),
        "ttft_ms_min": min(ttfts),
        "ttft_ms_max": max(ttfts),
        "itl_ms_median": _pct(itls, 50),
        "itl_ms_p90": _pct(itls, 90),
        "e2e_ms_median": _pct(e2es, 50),
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in results) / n,
        "completion_tokens_total": out_tokens,
        "tokens_per_chunk_mean": (streamed / chunks) if chunks and streamed else None,
    }


async def _sweep(port: int, messages: list[list[dict]], concurrencies: list[int], n: int,
                 max_tokens: int, progress: bool) -> tuple[list[dict], dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                         max_retries=0, timeout=3600.0)
    try:
        model_id = (await client.models.list()).data[0].id
        await _one_request(client, model_id, messages[0], max_tokens)  # warm-up, not measured
        before = await asyncio.to_thread(_scrape_metrics, port)
        levels = [await _level(client, model_id, messages, c, n, max_tokens, progress)
                  for c in concurrencies]
        after = await asyncio.to_thread(_scrape_metrics, port)
    finally:
        await client.close()
    return levels, _metrics_delta(before, after)


def serve_sweep(model: str, serve_args: list[str], env: dict[str, str], messages: list[list[dict]],
                concurrencies: list[int], max_tokens: int, log_path: str | os.PathLike,
                requests_per_level: int | None = None, ready_timeout: float = 900.0,
                progress: bool = True) -> dict:
    """Start ``vllm serve model *serve_args`` on a free loopback port (``env`` set on top of this
    process's environment; ``VLLM_CPU_KVCACHE_SPACE`` 2 GiB unless set, no
    ``VLLM_ENABLE_V1_MULTIPROCESSING``; output to ``log_path``), run the concurrency sweep (see
    the module docstring) and stop the server.

    Returns ``{"levels": [per-level stats], "server_start_s": seconds until /health answered,
    "metrics_delta": {method: {sample: delta}}, "cmd": the server command}``.
    """
    if not messages:
        raise ValueError("messages is empty")
    if not concurrencies or any(int(c) < 1 for c in concurrencies):
        raise ValueError(f"concurrencies must be positive integers, got {concurrencies!r}")
    n = len(messages) if requests_per_level is None else int(requests_per_level)
    if n < 1:
        raise ValueError(f"requests_per_level must be >= 1, got {n}")

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
        server_start_s = time.perf_counter() - t0
        levels, delta = asyncio.run(_sweep(port, messages, [int(c) for c in concurrencies], n,
                                           max_tokens, progress))
    finally:
        _stop(proc)
    return {"levels": levels, "server_start_s": server_start_s, "metrics_delta": delta, "cmd": cmd}


# ---- manual check ----------------------------------------------------------------------------


def _data_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _demo_messages(count: int, width: int, height: int) -> list[list[dict]]:
    from vllm_glimpse.testing.workloads import IMAGE_KINDS, synthetic_image

    out = []
    for i in range(count):
        image = synthetic_image(IMAGE_KINDS[i % len(IMAGE_KINDS)], width, height, seed=1000 + i)
        out.append([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(image)}},
            {"type": "text", "text": "Describe the image."},
        ]}])
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--concurrency", default="1,2", help="comma-separated levels (default 1,2)")
    p.add_argument("--requests", type=int, default=4, help="requests per level (default 4)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--image-size", default="336x336", help="WxH of the synthetic images")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="one argument for `vllm serve` (repeat; --serve-arg=--flag for flags)")
    p.add_argument("--vanilla", action="store_true", help='VLLM_PLUGINS="" (plugin not loaded)')
    p.add_argument("--log", default=None, help="server log (default: a temporary file)")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    width, height = (int(x) for x in args.image_size.lower().split("x"))
    env = {"VLLM_PLUGINS": ""} if args.vanilla else {}
    log = args.log or os.path.join(tempfile.mkdtemp(prefix="glimpse-online-"), "server.log")
    print(f"server log: {log}", file=sys.stderr)
    result = serve_sweep(args.model, args.serve_arg, env, _demo_messages(args.requests, width, height),
                         [int(c) for c in args.concurrency.split(",") if c.strip()], args.max_tokens,
                         log, requests_per_level=args.requests, ready_timeout=args.ready_timeout,
                         progress=not args.no_progress)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
