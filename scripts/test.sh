#!/usr/bin/env bash
# Runs the CPU test suite (unit, property and doctests) on every supported transformers stack.
#
#   bash scripts/test.sh                 # all stacks in ci/stacks/
#   STACKS="tf5" bash scripts/test.sh -k devices   # one stack, extra pytest arguments
#
# Each stack gets its own virtualenv under .venvs/, rebuilt only when its pins or
# pyproject.toml change. torch is pinned to 2.13.0 so that pip never pulls a multi-GB
# CUDA build on a CPU machine (set OMNIFIX_TORCH to override, e.g. "torch" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${OMNIFIX_TORCH:-torch==2.13.0}
STACKS=${STACKS:-$(cd ci/stacks && ls *.txt | sed 's/\.txt$//' | tr '\n' ' ')}

# pip install into a venv, keeping its exit status; drops pip's notes about local index folders.
pip_in() {
  local venv=$1
  shift
  "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

setup_stack() {
  local name=$1 venv=.venvs/$1
  local stamp
  stamp=$(cat "ci/stacks/$name.txt" pyproject.toml | sha256sum | cut -c1-16)
  if [[ -f $venv/.omnifix-stamp && $(cat "$venv/.omnifix-stamp") == "$stamp" ]]; then
    return
  fi
  echo "== setting up $venv"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  pip_in "$venv" --upgrade pip
  # torch first, so that nothing later resolves a different (CUDA) build.
  pip_in "$venv" "$TORCH_SPEC"
  pip_in "$venv" -e ".[dev]" -r "ci/stacks/$name.txt"
  echo "$stamp" >"$venv/.omnifix-stamp"
}

failed=()
for name in $STACKS; do
  setup_stack "$name"
  echo "== pytest on $name ($(".venvs/$name/bin/python" -c 'import transformers, accelerate, torch; print(f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, torch {torch.__version__}")'))"
  set +e
  ".venvs/$name/bin/python" -m pytest "$@"
  rc=$?
  set -e
  if [[ $rc -eq 5 ]]; then
    # pytest's "no tests collected": fine when the caller narrowed the selection, a defect otherwise.
    if [[ $# -gt 0 ]]; then echo "== $name: no test matched the selection"; rc=0; else rc=1; fi
  fi
  [[ $rc -eq 0 ]] || failed+=("$name")
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "== FAILED on: ${failed[*]}"
  exit 1
fi
echo "== all stacks passed: $STACKS"
