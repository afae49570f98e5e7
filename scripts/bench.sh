#!/usr/bin/env bash
# Runs benchmark suites on a GPU machine (two GPUs for capacity and the split cases), with the
# machine's own torch/transformers/accelerate. One suite per name, in the order given:
#
#   bash scripts/bench.sh accuracy capacity overhead timing        # every suite
#   SUITE_ARGS_overhead="--rounds 3" bash scripts/bench.sh overhead
#
# Results: $OMNIFIX_BENCH_OUT/<suite>.json (default benchmarks/results/new/), plus a log per suite;
# copy them to benchmarks/results/<suite>-<machine>-tf<version>.json and run benchmarks/plot.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OMNIFIX_BENCH_OUT:-benchmarks/results/new}
mkdir -p "$out"
status=0
for suite in "$@"; do
  extra_name=SUITE_ARGS_$suite
  read -r -a extra <<<"${!extra_name:-}"
  echo "== benchmark suite $suite ${extra[*]}"
  PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 python3 "benchmarks/$suite.py" \
    --out "$out/$suite.json" "${extra[@]}" 2>&1 | tee "$out/log-$suite.txt"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
exit $status
