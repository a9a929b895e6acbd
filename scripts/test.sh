#!/usr/bin/env bash
# Run the test suite on the CPU (sets up .venv first; see scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests "$@"
