#!/usr/bin/env bash
# Runs the GPU tests (tests/gpu: markers gpu and multi_gpu) on a GPU machine that has no network.
#
#   bash scripts/gpu.sh [PYTEST_ARGS...]     # default: every test marked gpu or multi_gpu
#
# Stacks: "image" uses the machine's own torch/transformers/accelerate; every folder .whl/<stack>/
# holds the wheels of another stack (e.g. transformers 4.45.2 + tokenizers 0.20.3 +
# huggingface_hub 0.36.0 + accelerate 1.0.1, downloaded for the machine's Python). "image+fa2" is
# the image with a flash-attn build on the path: the unpacked tree of a flash-attn wheel built for
# the machine's torch, CUDA and Python, packed as .fa2/flash_attn-*.tar.xz (OMNIFIX_FA2 names
# another file); without that file the stack is skipped with a note. .extras/ (from
# scripts/gpu_wheels.sh: bitsandbytes) is on every stack's path when it exists. Choose with
# STACKS="image image+fa2 tf4.45". Results (JUnit XML, logs, bug-zoo records) go to
# $OMNIFIX_GPU_OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OMNIFIX_GPU_OUT:-gpu-results}
mkdir -p "$out"
stacks=${STACKS:-image image+fa2 $(ls .whl 2>/dev/null | tr '\n' ' ')}
fa2=${OMNIFIX_FA2:-$(ls .fa2/flash_attn-*.tar.xz 2>/dev/null | head -n 1)}
[[ $# -gt 0 ]] || set -- tests -m "gpu or multi_gpu"
status=0
for stack in $stacks; do
  pythonpath=$PWD/src
  [[ -d .extras ]] && pythonpath=$PWD/.extras:$pythonpath
  if [[ $stack == image+fa2 ]]; then
    if [[ -z $fa2 || ! -f $fa2 ]]; then
      echo "== stack image+fa2 skipped: no flash-attn build (.fa2/flash_attn-*.tar.xz)"
      continue
    fi
    site=/tmp/omnifix-site-fa2
    rm -rf "$site" && mkdir -p "$site" && tar xJf "$fa2" -C "$site" || exit 1
    pythonpath=$site:$pythonpath
  elif [[ $stack != image ]]; then
    site=/tmp/omnifix-site-$stack
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" ".whl/$stack/"*.whl || exit 1
    pythonpath=$site:$pythonpath
  fi
  echo "== GPU tests on stack $stack"
  name=${stack//+/-} # file names without "+": image+fa2 -> image-fa2
  PYTHONPATH=$pythonpath OMNIFIX_ZOO_RECORD=$out/zoo-$name.jsonl python3 -m pytest \
    -p no:cacheprovider -rA --junitxml="$out/junit-$name.xml" "$@" 2>&1 | tee "$out/log-$name.txt"
  rc=${PIPESTATUS[0]}
  [[ $rc -eq 0 || $rc -eq 5 ]] || status=1
done
exit $status
