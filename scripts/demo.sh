#!/usr/bin/env bash
# Offline batched generation on an embedded tiny model (sets up .venv first).
# Extra arguments go to `python -m vllm_glimpse.demo`, e.g. --model llava --method visionzip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m vllm_glimpse.demo "$@"
