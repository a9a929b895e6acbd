"""Running one benchmark configuration in its own process (shared by the benchmark scripts).

Each configuration runs ``<script> --worker SPEC --worker-out OUT`` in a fresh interpreter, so
that vanilla vLLM can run without the plugin loaded at all (``VLLM_PLUGINS=""``) and every engine
starts from a clean process with the same thread count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def worker_env(threads: int, kv_cache_gib: int, engine_env: dict[str, str], plugin: bool) -> dict[str, str]:
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
