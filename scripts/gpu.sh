#!/usr/bin/env bash
# Runs the GPU tests (tests/gpu: markers gpu and multi_gpu) on a GPU machine that has no network.
#
#   bash scripts/gpu.sh [PYTEST_ARGS...]     # default: every test marked gpu or multi_gpu
#
# Stacks: "image" uses the machine's own torch/transformers/accelerate; every folder .whl/<stack>/
# holds the wheels of another stack (e.g. transformers 4.45.2 + tokenizers 0.20.3 +
# huggingface_hub 0.36.0 + accelerate 1.0.1, downloaded for the machine's Python). Choose with
# STACKS="image tf4.45". Results (JUnit XML, logs, bug-zoo records) go to $OMNIFIX_GPU_OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OMNIFIX_GPU_OUT:-gpu-results}
mkdir -p "$out"
stacks=${STACKS:-image $(ls .whl 2>/dev/null | tr '\n' ' ')}
[[ $# -gt 0 ]] || set -- tests -m "gpu or multi_gpu"
status=0
for stack in $stacks; do
  pythonpath=$PWD/src
  if [[ $stack != image ]]; then
    site=/tmp/omnifix-site-$stack
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" ".whl/$stack/"*.whl || exit 1
    pythonpath=$site:$pythonpath
  fi
  echo "== GPU tests on stack $stack"
  PYTHONPATH=$pythonpath OMNIFIX_ZOO_RECORD=$out/zoo-$stack.jsonl python3 -m pytest \
    -p no:cacheprovider -rA --junitxml="$out/junit-$stack.xml" "$@" 2>&1 | tee "$out/log-$stack.txt"
  rc=${PIPESTATUS[0]}
  [[ $rc -eq 0 || $rc -eq 5 ]] || status=1
done
exit $status
