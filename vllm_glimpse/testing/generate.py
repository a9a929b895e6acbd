"""Run greedy generation on a tiny model, in this process or in a clean subprocess.

The subprocess form is how tests get *vanilla* vLLM: ``VLLM_PLUGINS=""`` in its environment
means vLLM loads no general plugin at all, so none of our code is registered there (the child
checks that), and the tokens it prints are vLLM's own.

Command line::

    python -m vllm_glimpse.testing.generate --model DIR --requests specs.json --out tokens.json \
        [--vanilla] [--method visionzip --knob dominant=54 ...] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_glimpse.testing.workloads import ImageSpec, RequestSpec, build_request

# Engine arguments for the tiny fixtures on the CPU: float32 so that comparisons against HF
# transformers are exact, eager mode so that an engine starts in seconds, and the model runner
# in the engine core's process (with VLLM_ENABLE_V1_MULTIPROCESSING=0, in the caller's).
TINY_ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",
    "limit_mm_per_prompt": {"image": 2},
    "enforce_eager": True,
    "seed": 0,
    "distributed_executor_backend": "uni",
}


def specs_to_json(specs: Sequence[RequestSpec]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in specs]


def specs_from_json(data: Sequence[dict[str, Any]]) -> list[RequestSpec]:
    return [
        RequestSpec(d["text"], tuple(ImageSpec(**i) for i in d.get("images", ()))) for d in data
    ]


def model_runner_kind(worker) -> str:
    """"v2" when a worker runs vLLM's Model Runner V2 (``vllm/v1/worker/gpu/``), else "v1"."""
    modules = {klass.__module__ for klass in type(worker.model_runner).__mro__}
    return "v2" if "vllm.v1.worker.gpu.model_runner" in modules else "v1"


def check_model_runner(llm: Any) -> str:
    """Fail unless the engine runs the model runner the test run asked for: Model Runner V2
    with ``VLLM_GLIMPSE_CPU_MRV2=1`` (or on a GPU, where vLLM picks it), else V1 -- so that a
    suite run on one runner cannot silently test the other. vLLM's own choice (which its
    scheduler and workers read) is checked, and the runner the worker built where the worker is
    in this process."""
    from vllm.platforms import current_platform

    from vllm_glimpse.cpu_mrv2 import requested

    want = "v2" if requested() or not current_platform.is_cpu() else "v1"
    # (vLLM 0.34 has only Model Runner V2, and no use_v2_model_runner)
    kinds = {"v2" if getattr(llm.llm_engine.vllm_config, "use_v2_model_runner", True) else "v1"}
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # in-process engine core
    wrapper = getattr(getattr(core, "model_executor", None), "driver_worker", None)
    if wrapper is not None:
        kinds.add(model_runner_kind(wrapper.worker))
    if kinds != {want}:
        switch = os.environ.get("VLLM_GLIMPSE_CPU_MRV2")
        raise AssertionError(f"the engine runs model runner {sorted(kinds)}, the test run asked "
                             f"for {want!r} (VLLM_GLIMPSE_CPU_MRV2={switch!r})")
    return want


def make_llm(model: str | os.PathLike, *, method: str | None = "none",
             knobs: dict[str, Any] | None = None, **engine_args: Any):
    """An LLM on ``model``; ``method=None`` means no plugin settings at all (vanilla)."""
    from vllm import LLM

    import vllm_glimpse

    kwargs = dict(TINY_ENGINE_ARGS)
    kwargs.update(engine_args)
    if method is not None:
        kwargs.update(vllm_glimpse.engine_kwargs(method, **(knobs or {})))
    llm = LLM(model=str(model), **kwargs)
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:  # else the caller chose the runner
        try:
            check_model_runner(llm)
        except BaseException:
            shutdown(llm)
            raise
    return llm


def generate_tokens(llm: Any, specs: Sequence[RequestSpec], max_tokens: int = 16) -> list[list[int]]:
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompts = [build_request(tokenizer, s) for s in specs]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def shutdown(llm: Any) -> None:
    """Stop the engine core process now rather than at garbage collection."""
    import gc

    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def generate_in_subprocess(
    model: str | os.PathLike,
    specs: Sequence[RequestSpec],
    *,
    vanilla: bool,
    method: str = "none",
    knobs: dict[str, Any] | None = None,
    max_tokens: int = 16,
    timeout: float = 900,
) -> list[list[int]]:
    with tempfile.TemporaryDirectory() as tmp:
        req_file, out_file = Path(tmp, "requests.json"), Path(tmp, "tokens.json")
        req_file.write_text(json.dumps(specs_to_json(specs)))
        cmd = [sys.executable, "-m", "vllm_glimpse.testing.generate", "--model", str(model),
               "--requests", str(req_file), "--out", str(out_file),
               "--max-tokens", str(max_tokens)]
        env = dict(os.environ)
        if vanilla:
            cmd.append("--vanilla")
            env["VLLM_PLUGINS"] = ""
        else:
            cmd += ["--method", method]
            for k, v in (knobs or {}).items():
                cmd += ["--knob", f"{k}={json.dumps(v)}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"generation subprocess failed ({proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(out_file.read_text())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True, help="JSON list of RequestSpec dicts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--vanilla", action="store_true",
                        help="run vLLM without the plugin (requires VLLM_PLUGINS='')")
    parser.add_argument("--method", default="none")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    specs = specs_from_json(json.loads(Path(args.requests).read_text()))
    if args.vanilla:
        if os.environ.get("VLLM_PLUGINS") != "":
            parser.error("--vanilla needs VLLM_PLUGINS='' so that vLLM loads no plugin")
        llm = make_llm(args.model, method=None)
        from vllm import ModelRegistry

        from vllm_glimpse.settings import VARIANTS

        leaked = set(ModelRegistry.get_supported_archs()) & {v.arch for v in VARIANTS.values()}
        if leaked:
            raise SystemExit(f"vanilla run has plugin architectures registered: {leaked}")
    else:
        knobs = {}
        for item in args.knob:
            name, _, value = item.partition("=")
            knobs[name] = json.loads(value)
        llm = make_llm(args.model, method=args.method, knobs=knobs)
    tokens = generate_tokens(llm, specs, args.max_tokens)
    Path(args.out).write_text(json.dumps(tokens))
    shutdown(llm)


if __name__ == "__main__":
    main()
