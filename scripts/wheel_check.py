"""Run vLLM from an installed (non-editable) wheel of vllm-glimpse: one VisionZip generation and
one vanilla generation on the tiny LLaVA-1.5, on the CPU engine.

Called by ``scripts/wheel_check.sh`` with ``PYTHONPATH`` pointing at a ``pip install --target``
directory of the wheel, from a directory outside the checkout, so every module of the plugin
(in the front end and in the engine core process) comes from the wheel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    site = Path(os.environ["VLLM_GLIMPSE_WHEEL_SITE"]).resolve()

    import vllm_glimpse
    import vllm_glimpse.engine.engine_config
    import vllm_glimpse.kernels

    for module in (vllm_glimpse, vllm_glimpse.engine.engine_config, vllm_glimpse.kernels):
        where = Path(module.__file__).resolve()
        if site not in where.parents:
            print(f"wheel check: {module.__name__} comes from {where}, not the wheel in {site}")
            return 1

    from vllm import SamplingParams

    from vllm_glimpse.testing.generate import make_llm, shutdown
    from vllm_glimpse.testing.tiny_models import tiny_model_path
    from vllm_glimpse.testing.workloads import ImageSpec, RequestSpec, build_request

    model = tiny_model_path("llava")
    spec = RequestSpec("Describe the image.", (ImageSpec("gradient", 336, 336, 1),))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = {}
    for name, method, knobs in (("visionzip", "visionzip", {"dominant": 54, "contextual": 10}),
                                ("vanilla", None, None)):
        llm = make_llm(model, method=method, knobs=knobs)
        out = llm.generate([build_request(llm.get_tokenizer(), spec)], params, use_tqdm=False)[0]
        stats = (out.kv_transfer_params or {}).get("vllm_glimpse")
        results[name] = (len(out.prompt_token_ids), len(out.outputs[0].token_ids), stats)
        shutdown(llm)
        print(f"wheel check: {name}: {results[name]}", flush=True)

    vz_prompt, vz_out, vz_stats = results["visionzip"]
    va_prompt, va_out, va_stats = results["vanilla"]
    problems = []
    if vz_stats is None or vz_stats.get("image_tokens_after") != 64:
        problems.append(f"VisionZip did not keep 54 + 10 image tokens: {vz_stats}")
    if va_stats is not None:
        problems.append(f"the vanilla engine reported pruning: {va_stats}")
    if vz_out != 8 or va_out != 8:
        problems.append(f"expected 8 generated tokens each, got {vz_out} and {va_out}")
    if va_prompt - vz_prompt != 576 - 64:
        problems.append(f"prompt lengths {vz_prompt} (VisionZip) and {va_prompt} (vanilla) do not "
                        f"differ by the 576 - 64 pruned image tokens")
    for p in problems:
        print(f"wheel check FAILED: {p}")
    if not problems:
        print("wheel check: OK (VisionZip and vanilla generations from the installed wheel)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
