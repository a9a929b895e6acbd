#!/usr/bin/env bash
# Build the wheel, install it non-editable into a directory of its own, and run vLLM from it
# (scripts/wheel_check.py): the editable install the tests use cannot see a module missing from
# the wheel. Uses the environment of scripts/setup_env.sh for vLLM and torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
bash scripts/setup_env.sh
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf build  # a stale build/lib would add deleted modules to the wheel
.venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w "$TMP/dist" . 2>&1 \
  | grep -v '^WARNING: Location' || true
rm -rf build
.venv/bin/python -m pip install --quiet --no-deps --target "$TMP/site" "$TMP"/dist/*.whl 2>&1 \
  | grep -v '^WARNING: Location' || true
echo "[wheel] $(ls "$TMP"/dist): $(cd "$TMP/site" && find vllm_glimpse -name '*.py' | wc -l) modules" >&2
cd "$TMP"
VLLM_CPU_KVCACHE_SPACE=1 VLLM_GLIMPSE_WHEEL_SITE="$TMP/site" PYTHONPATH="$TMP/site" "$REPO/.venv/bin/python" "$REPO/scripts/wheel_check.py"
