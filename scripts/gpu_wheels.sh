#!/usr/bin/env bash
# Downloads, here, the wheels of the older stacks that scripts/gpu.sh installs on a GPU machine with no
# network (CPython 3.12, x86-64): .whl/tf4.45 and .whl/tf4.52. The GPU machine's own image provides the
# newest stack (torch, transformers 5.x, accelerate) and everything these packages need besides.
# Packages every stack uses besides (bitsandbytes, for the quantised-load tests) are unpacked into
# .extras/, which scripts/gpu.sh puts on every stack's path; of bitsandbytes' native libraries only
# the cpu and CUDA 12.8+ ones are kept, so that the folder stays small enough to copy.
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
rm -rf .extras && mkdir -p .extras/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d .extras/wheels bitsandbytes==0.50.2
python3 - <<'PY'
import pathlib, re, zipfile

keep = re.compile(r"libbitsandbytes_(cpu|cuda12[89]|cuda13\d)\.so$")
for wheel in pathlib.Path(".extras/wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.endswith(".so") or keep.search(name):
                archive.extract(name, ".extras")
PY
rm -rf .extras/wheels
ls -1 .whl/*/ .extras/
