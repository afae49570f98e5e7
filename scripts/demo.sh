#!/usr/bin/env bash
# Sets up .venv (once) and runs `omnifix demo`: a tiny built-in model, loaded offline and placed on
# whatever devices this machine has, with a printed placement report. Extra arguments go to the demo.
#
# torch: if the system Python already has torch (a GPU image, say), the venv reuses it; otherwise
# torch 2.13.0 is installed first, so that nothing later resolves another build (set OMNIFIX_TORCH to
# choose another spec; on Linux the package index's torch is the CUDA build, and
# OMNIFIX_TORCH_INDEX=https://download.pytorch.org/whl/cpu gives the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f .venv/.omnifix-stamp || $(cat .venv/.omnifix-stamp) != "$stamp" ]]; then
  rm -rf .venv
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
    index=${OMNIFIX_TORCH_INDEX:-} # e.g. https://download.pytorch.org/whl/cpu: the CPU build on Linux
    .venv/bin/python -m pip install -q "${OMNIFIX_TORCH:-torch==2.13.0}" ${index:+--index-url "$index"}
  fi
  .venv/bin/python -m pip install -q -e .
  echo "$stamp" >.venv/.omnifix-stamp
fi
exec .venv/bin/omnifix demo "$@"
