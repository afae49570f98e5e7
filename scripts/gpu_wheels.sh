#!/usr/bin/env bash
# Downloads, here, the wheels of the older stacks that scripts/gpu.sh installs on a GPU machine with no
# network (CPython 3.12, x86-64): .whl/tf4.45 and .whl/tf4.52. The GPU machine's own image provides the
# newest stack (torch, transformers 5.x, accelerate) and everything these packages need besides.
set -euo pipefail
cd "$(dirname "$0")/.."
fetch() {
  local stack=$1
  shift
  mkdir -p ".whl/$stack"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d ".whl/$stack" "$@"
}
fetch tf4.45 transformers==4.45.2 tokenizers==0.20.3 huggingface_hub==0.36.0 accelerate==1.0.1
fetch tf4.52 transformers==4.52.4 tokenizers==0.21.4 huggingface_hub==0.36.0 accelerate==1.7.0
ls -1 .whl/*/
