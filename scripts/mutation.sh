#!/usr/bin/env bash
# Mutation testing of omnifix's core (mutmut, pinned): does the test suite notice each small change?
#
#   bash scripts/mutation.sh                      # every module below, one after the other
#   bash scripts/mutation.sh _devices _meta       # some of them
#   MUTATION_JOBS=4 bash scripts/mutation.sh      # more parallel test runs (default 2)
#
# Each module is mutated alone, in its own copy of the repository under .mutation/<module>, and
# each mutant runs only the tests of that module's selection below that reach the mutated function
# (mutmut records which tests call what). The score is killed / (killed + survived), a timeout
# counting as killed (the mutant made the tests hang), printed per module at the end;
# docs/mutation.md records the last scores. Every module takes 1 to 4 minutes on 2 cores, all five
# about 12 (building .venvs/mut first adds about 6). The planner's strategies are tested here by
# tests/test_strategies.py (GPT-2 and Qwen3-8B presets, every row checked), not by
# tests/test_plan.py, whose full-size presets take far longer per mutant. Lines that hold nothing but message text (the continuation lines of error messages)
# are not mutated: tests/test_bad_inputs.py checks what each message must say (the value and the
# fix), and a test per word of wording would only pin the prose.
#
# The virtualenv .venvs/mut is made on the first run: torch 2.13.0 (a CPU build), the tf5 stack,
# omnifix's test dependencies and mutmut; omnifix itself is not installed there, so the tests
# import the mutated copy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MUTMUT=mutmut==3.8.1
TORCH_SPEC=${OMNIFIX_TORCH:-torch==2.13.0}
VENV=.venvs/mut
JOBS=${MUTATION_JOBS:-2}
# mutmut forks a test run per mutant: torch's thread pools do not survive a fork, one thread does.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

# module (under src/omnifix) -> the tests that exercise it
declare -A SELECTION=(
  [_devices]="tests/test_devices.py"
  [_meta]="tests/test_meta.py"
  [_embeddings]="tests/test_embeddings.py"
  [_dispatch]="tests/test_dispatch.py"
  [_plan/strategies]="tests/test_strategies.py"
)
ORDER=(_devices _meta _embeddings _dispatch _plan/strategies)
# A line that is only a string literal: the text of a message, continued from the line above.
WORDING='^\s*(f|rf|fr)?"[^"]*"\)?,?\s*(#.*)?$'

stamp=$(echo "$MUTMUT $TORCH_SPEC" | cat - ci/stacks/tf5.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f $VENV/.omnifix-stamp || $(cat "$VENV/.omnifix-stamp") != "$stamp" ]]; then
  echo "== setting up $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"  # first, so nothing pulls a CUDA build
  "$VENV/bin/python" -m pip install -q -e ".[test]" -r ci/stacks/tf5.txt "$MUTMUT"
  "$VENV/bin/python" -m pip uninstall -q -y omnifix  # the tests must import the mutants
  echo "$stamp" >"$VENV/.omnifix-stamp"
fi
MUTMUT_BIN=$(cd "$VENV/bin" && pwd)/mutmut

modules=("$@")
[[ ${#modules[@]} -gt 0 ]] || modules=("${ORDER[@]}")
summary=()
for module in "${modules[@]}"; do
  tests=${SELECTION[$module]:?"unknown module $module; choose from: ${ORDER[*]}"}
  work=.mutation/${module//\//.}
  echo "== mutating src/omnifix/$module.py with: $tests"
  rm -rf "$work"
  mkdir -p "$work"
  cp -r src tests benchmarks pyproject.toml "$work/"
  {
    echo "[mutmut]"
    echo "source_paths = src"
    echo "only_mutate = src/omnifix/$module.py"
    echo "also_copy = benchmarks"
    echo "do_not_mutate_patterns = $WORDING"
    # One arg a line. The 10,000-example device property would make every surviving mutant of
    # normalize_device cost half a minute; tests/test_devices.py's properties cover it here.
    echo "pytest_add_cli_args ="
    printf '    %s\n' -p no:cacheprovider -q -x -k "not test_docs_list and not test_any_device_string"
    echo "pytest_add_cli_args_test_selection ="
    for test in $tests; do echo "    $test"; done
  } >"$work/setup.cfg"
  (cd "$work" && "$MUTMUT_BIN" run --max-children "$JOBS" >run.log 2>&1) || {
    tail -20 "$work/run.log"
    exit 1
  }
  (cd "$work" && "$MUTMUT_BIN" results --all true >results.txt)
  line=$(awk -F': ' -v module="$module" '
    /: / { count[$2]++ }
    END {
      killed = count["killed"] + count["timeout"]; survived = count["survived"]
      total = killed + survived
      printf "%-17s %4d killed (%d by timeout), %3d survived, %3d without tests: %.1f %%",
        module, killed, count["timeout"], survived, count["no tests"], total ? 100 * killed / total : 0
    }' "$work/results.txt")
  echo "== $line"
  summary+=("$line")
done
echo "== mutation scores (survivors: bash -c 'cd .mutation/<module> && $MUTMUT_BIN results')"
printf '%s\n' "${summary[@]}"
