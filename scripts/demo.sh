#!/usr/bin/env bash
# The product on an embedded tiny model (sets up .venv first): one mixed batch through vanilla
# vLLM, VisionZip and GlimpsePrune, with a table of what each method kept per request.
# Extra arguments go to `python -m vllm_glimpse.demo`, e.g. --model llava --method visionzip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m vllm_glimpse.demo "$@"
