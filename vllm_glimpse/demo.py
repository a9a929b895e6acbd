"""Offline batched generation on an embedded tiny model, printing each request's output.

    python -m vllm_glimpse.demo [--model qwen2_5_vl|llava|llava_next|DIR] [--method METHOD]
                                [--knob NAME=VALUE ...] [--max-tokens N]

The tiny models are generated on first use (random weights, no download), so the text is
gibberish; what the demo shows is the engine path: a mixed batch (images of several sizes, a
two-image prompt, text-only prompts) through vLLM with the plugin's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence


def _parse_knob(item: str) -> tuple[str, object]:
    name, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--knob wants NAME=VALUE, got {item!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a bare string, e.g. a checkpoint path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="vllm-glimpse demo on a tiny model")
    parser.add_argument("--model", default="qwen2_5_vl",
                        help="a tiny fixture name (qwen2_5_vl, llava, llava_next) or a model dir")
    parser.add_argument("--method", default="none", help="none | visionzip | glimpse")
    parser.add_argument("--knob", action="append", default=[], type=_parse_knob,
                        metavar="NAME=VALUE", help="a setting of the method, e.g. dominant=54")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; plenty for the tiny models
    import vllm_glimpse
    from vllm_glimpse.testing.generate import TINY_ENGINE_ARGS
    from vllm_glimpse.testing.tiny_models import MODEL_NAMES, tiny_model_path
    from vllm_glimpse.testing.workloads import build_request, mixed_batch

    # Settings errors surface here, before an engine starts.
    overrides = vllm_glimpse.engine_kwargs(args.method, **dict(args.knob))
    model = str(tiny_model_path(args.model)) if args.model in MODEL_NAMES else args.model
    if not Path(model).exists():
        parser.error(f"--model: {model!r} is neither a tiny fixture ({', '.join(MODEL_NAMES)}) "
                     "nor a directory")

    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **{**TINY_ENGINE_ARGS, **overrides})
    specs = mixed_batch()
    tokenizer = llm.get_tokenizer()
    prompts = [build_request(tokenizer, s) for s in specs]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start

    print(f"\nmodel: {model}  method: {args.method}  knobs: {dict(args.knob)}")
    for i, (spec, out) in enumerate(zip(specs, outputs)):
        images = ", ".join(f"{im.kind} {im.width}x{im.height}" for im in spec.images) or "none"
        completion = out.outputs[0]
        print(f"[{i}] images: {images}")
        print(f"    prompt: {spec.text!r}  ({len(out.prompt_token_ids)} prompt tokens)")
        print(f"    output: {completion.text!r}  ({len(completion.token_ids)} tokens)")
    print(f"{len(outputs)} requests in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
