"""What the plugin does, on an embedded tiny model: the same mixed batch through vanilla vLLM,
VisionZip and GlimpsePrune, and per request and method the image tokens before -> after, the
prompt tokens sent -> computed past pruning, the KV blocks the request holds once its prefill is
done, and each method's wall time.

    python -m vllm_glimpse.demo [--model qwen2_5_vl|llava|llava_next|DIR] [--method METHOD]
                                [--knob NAME=VALUE ...] [--max-tokens N] [--text]

``--method all`` (the default) runs vanilla, visionzip and glimpse (glimpse where the model has
it); one of ``vanilla``, ``none``, ``visionzip``, ``glimpse`` runs just that one, with
``--knob`` settings of that method. ``vanilla`` is vLLM's own model with no plugin settings;
``none`` is the plugin's model variant with pruning off (token-identical to vanilla).

The tiny models are generated on first use (random weights, no download) and GlimpsePrune gets a
synthetic checkpoint in the authors' layout, written next to them: the completions are noise.
Random predictor weights decide nothing meaningful, so the demo forces GlimpsePrune's keep rule
to a fixed ratio close to VisionZip's budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Methods of ``--method all``, in the order the table lists them.
ALL_METHODS = ("vanilla", "visionzip", "glimpse")

#: The demo's budgets when ``--knob`` does not set one, per model family: VisionZip at about a
#: quarter of Qwen2.5-VL's image tokens, or the authors' 64-token split (54 + 10) on LLaVA;
#: GlimpsePrune forced to about the same share (on LLaVA the authors' "<= 11.1 %" setting).
DEMO_KNOBS = {
    ("qwen", "visionzip"): {"dominant_ratio": 0.2, "contextual_ratio": 0.05},
    ("qwen", "glimpse"): {"fixed_ratio": 0.25},
    ("llava", "visionzip"): {"dominant": 54, "contextual": 10},
    ("llava", "glimpse"): {"fixed_ratio": 0.111},
}

#: KV block size of the demo's engines: small enough that pruning shows in whole blocks on the
#: tiny models' short prompts (vLLM's CPU default is 128 tokens).
BLOCK_SIZE = 32

#: Tiny models GlimpsePrune runs on (a synthetic checkpoint exists for them).
GLIMPSE_FAMILIES = ("qwen2_5_vl", "llava")


@dataclass
class RequestRow:
    """One request under one method, as the table prints it."""

    image_tokens_before: int
    image_tokens_after: int
    prompt_tokens_sent: int
    prompt_tokens_kept: int
    kv_blocks: int
    text: str


@dataclass
class MethodRun:
    method: str
    knobs: dict[str, Any]
    start_s: float
    generate_s: float
    rows: list[RequestRow] = field(default_factory=list)


def _parse_knob(item: str) -> tuple[str, object]:
    name, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--knob wants NAME=VALUE, got {item!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a bare string, e.g. a checkpoint path


def _family(model_dir: str) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return "llava" if config.get("model_type", "").startswith("llava") else "qwen"


def demo_checkpoint(name: str) -> Path:
    """The synthetic GlimpsePrune checkpoint of tiny model ``name``, written on first use next to
    the tiny models (in a temporary directory, then renamed)."""
    from transformers import AutoConfig

    from vllm_glimpse.testing.glimpse_checkpoints import write_tiny_checkpoint
    from vllm_glimpse.testing.tiny_models import FIXTURE_VERSION, tiny_model_path

    model = tiny_model_path(name)
    final = model.parent / f"{name}-glimpse-checkpoint-{FIXTURE_VERSION}"
    if (final / "new_modules_gp.pt").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=model.parent))
    try:
        written = write_tiny_checkpoint(tmp / "ckpt", name, AutoConfig.from_pretrained(model))
        try:
            os.rename(written, final)
        except OSError:  # another process got there first
            if not (final / "new_modules_gp.pt").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _image_token_id(llm) -> int:
    config = llm.llm_engine.vllm_config.model_config.hf_config
    token = getattr(config, "image_token_id", None)
    return int(token if token is not None else config.image_token_index)


def run_method(model: str, method: str, knobs: dict[str, Any], specs, max_tokens: int) -> MethodRun:
    """Start an engine for ``method``, run the batch step by step (to read each request's KV
    blocks when its prefill is done), stop the engine."""
    from vllm import LLM, SamplingParams

    import vllm_glimpse
    from vllm_glimpse.stats import STATS_KEY
    from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS, shutdown
    from vllm_glimpse.testing.workloads import build_request

    settings = {} if method == "vanilla" else vllm_glimpse.engine_kwargs(method, **knobs)
    t0 = time.perf_counter()
    llm = LLM(model=model, **{**TINY_ENGINE_ARGS, "block_size": BLOCK_SIZE, **settings})
    try:
        # One-time work (a kernel's first build, first-call set-up) belongs to the start, not to
        # the method's batch: one request on other images runs first, then the prefix cache is
        # emptied so the batch finds nothing of it.
        warm_up = _warm_up_request(specs)
        if warm_up is not None:
            llm.generate([build_request(llm.get_tokenizer(), warm_up)],
                         SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
            llm.reset_prefix_cache()
        start_s = time.perf_counter() - t0
        engine = llm.llm_engine
        # The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so its
        # scheduler and KV block pool can be read between steps.
        scheduler = engine.engine_core.engine_core.scheduler
        req_to_blocks = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks
        image_token = _image_token_id(llm)
        tokenizer = llm.get_tokenizer()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        ids = [engine.add_request(str(i), build_request(tokenizer, s), params)
               for i, s in enumerate(specs)]
        blocks: dict[str, int] = {}
        outputs: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            # A request's blocks once the step that finished its prefill is done: GlimpsePrune
            # frees the pruned tail in that same step.
            for request in list(scheduler.running):
                if (request.request_id not in blocks
                        and request.num_computed_tokens >= request.num_prompt_tokens):
                    blocks[request.request_id] = len(req_to_blocks.get(request.request_id, ()))
        generate_s = time.perf_counter() - t0
    finally:
        shutdown(llm)
    run = MethodRun(method, knobs, start_s, generate_s)
    for i, req_id in enumerate(ids):
        out = outputs[str(i)]
        stats = (out.kv_transfer_params or {}).get(STATS_KEY)
        sent = len(out.prompt_token_ids)
        if stats is None:  # not pruned: every image token stays
            before = after = sum(1 for t in out.prompt_token_ids if t == image_token)
            kept = sent
        else:
            before, after = stats["image_tokens_before"], stats["image_tokens_after"]
            sent, kept = stats["prompt_tokens_before"], stats["prompt_tokens_after"]
        run.rows.append(RequestRow(before, after, sent, kept, blocks.get(req_id, -1),
                                   out.outputs[0].text))
    return run


def _warm_up_request(specs):
    """The batch's first request with images, on images of the same sizes but other content."""
    spec = next((s for s in specs if s.images), None)
    if spec is None:
        return None
    images = tuple(dataclasses.replace(im, seed=im.seed + 10_000) for im in spec.images)
    return dataclasses.replace(spec, images=images)


def _describe(spec) -> str:
    images = " + ".join(f"{im.width}x{im.height}" for im in spec.images) or "text only"
    return f"{images}: {spec.text!r}"


def format_table(model: str, runs: list[MethodRun], specs, show_text: bool) -> str:
    lines = [f"model: {model}   KV block size: {BLOCK_SIZE} tokens"]
    for run in runs:
        knobs = ", ".join(f"{k}={v}" for k, v in run.knobs.items()) or "-"
        lines.append(f"  {run.method:<10} settings: {knobs}")
    lines.append("")
    header = (f"{'request':<52} {'method':<10} {'image tokens':>14} {'prompt tokens':>15} "
              f"{'KV blocks':>9}")
    lines += [header, "-" * len(header)]
    for i, spec in enumerate(specs):
        for j, run in enumerate(runs):
            row = run.rows[i]
            label = f"[{i}] {_describe(spec)}" if j == 0 else ""
            lines.append(
                f"{label[:52]:<52} {run.method:<10} "
                f"{f'{row.image_tokens_before} -> {row.image_tokens_after}':>14} "
                f"{f'{row.prompt_tokens_sent} -> {row.prompt_tokens_kept}':>15} {row.kv_blocks:>9}")
            if show_text:
                lines.append(f"{'':<52} {'':<10} {row.text!r}")
    lines.append("")
    lines.append("prompt tokens: sent -> computed past pruning (GlimpsePrune keeps every token "
                 "through layer K). KV blocks: held once the request's prefill is done.")
    for run in runs:
        before = sum(r.image_tokens_before for r in run.rows)
        after = sum(r.image_tokens_after for r in run.rows)
        blocks = sum(r.kv_blocks for r in run.rows)
        lines.append(f"{run.method:<10} image tokens {before} -> {after}, KV blocks {blocks}, "
                     f"{len(run.rows)} requests in {run.generate_s:.2f} s "
                     f"(engine start and one warm-up request {run.start_s:.1f} s)")
    lines.append("Wall times are one cold run on a tiny model, not a speed comparison "
                 "(benchmarks/ measures speed).")
    lines.append("The tiny models' weights are random, so the generated text is noise: the demo "
                 "shows what each method keeps, not answers.")
    return "\n".join(lines)


def run_demo(argv: Sequence[str] | None = None) -> tuple[list[MethodRun], str]:
    """Parse the command line, run each method, print the table; (the runs, the table)."""
    parser = argparse.ArgumentParser(description="vllm-glimpse demo on a tiny model")
    parser.add_argument("--model", default="qwen2_5_vl",
                        help="a tiny fixture name (qwen2_5_vl, llava, llava_next, ...) or a model dir")
    parser.add_argument("--method", default="all",
                        help="all (vanilla, visionzip, glimpse) | vanilla | none | visionzip | glimpse")
    parser.add_argument("--knob", action="append", default=[], type=_parse_knob,
                        metavar="NAME=VALUE", help="a setting of --method, e.g. dominant=54")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--text", action="store_true", help="print each completion too")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:  # a request that ends in its prefill step frees its blocks in it
        parser.error("--max-tokens must be at least 2 (KV blocks are read after the prefill)")

    # Before vLLM is imported: the engine core in this process (its scheduler is read between
    # steps; it also starts faster on a small machine), a small KV cache, logs that leave the
    # table readable (errors still show).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; plenty for the tiny models
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import vllm_glimpse
    from vllm_glimpse.testing.tiny_models import MODEL_NAMES, tiny_model_path
    from vllm_glimpse.testing.workloads import mixed_batch

    fixture = args.model in MODEL_NAMES
    model = str(tiny_model_path(args.model)) if fixture else args.model
    if not (Path(model) / "config.json").is_file():
        parser.error(f"--model: {model!r} is neither a tiny fixture ({', '.join(MODEL_NAMES)}) "
                     "nor a model directory")
    family = _family(model)
    knobs = dict(args.knob)
    if args.method == "all":
        if knobs:
            parser.error("--knob sets one method's settings: pick that --method")
        methods = [m for m in ALL_METHODS
                   if m != "glimpse" or (fixture and args.model in GLIMPSE_FAMILIES)]
    else:
        methods = [args.method]
        if args.method == "vanilla" and knobs:
            parser.error("--method vanilla takes no --knob (it runs vLLM without plugin settings)")
    plan = []
    for method in methods:
        method_knobs = knobs if args.method != "all" else dict(DEMO_KNOBS.get((family, method), {}))
        if method == "glimpse" and "checkpoint" not in method_knobs:
            if not (fixture and args.model in GLIMPSE_FAMILIES):
                parser.error("--method glimpse on this model needs --knob checkpoint=DIR")
            method_knobs = {"checkpoint": str(demo_checkpoint(args.model)),
                            **(method_knobs or DEMO_KNOBS[(family, "glimpse")])}
        if method != "vanilla":
            vllm_glimpse.engine_kwargs(method, **method_knobs)  # settings errors, before any engine
        plan.append((method, method_knobs))

    specs = mixed_batch()
    runs = []
    for method, method_knobs in plan:
        print(f"[demo] {method}: starting an engine and generating ...", flush=True)
        runs.append(run_method(model, method, method_knobs, specs, args.max_tokens))
    table = format_table(model, runs, specs, args.text)
    print()
    print(table)
    return runs, table


def main(argv: Sequence[str] | None = None) -> int:
    run_demo(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
