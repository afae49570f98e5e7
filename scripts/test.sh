#!/usr/bin/env bash
# Runs the CPU test suite (unit, property and doctests) on every supported transformers stack.
#
#   bash scripts/test.sh                           # all stacks in ci/stacks/
#   STACKS="tf5" bash scripts/test.sh -k devices   # one stack, extra pytest arguments
#
# Stacks (ci/stacks/<name>.txt): the oldest supported and the last 4.x releases are pinned; the newest
# stack (tf5) names no versions, so pip resolves the newest transformers and accelerate released when
# the stack is built. ci/stacks/<name>.nodeps.txt, where it exists, is installed with --no-deps (a
# package whose declared dependencies are far more than the code the tests import needs).
#
# The newest stack runs every test, spread over the cores (pytest-xdist); the older stacks run the
# tests whose outcome depends on the transformers version (all but those marked any_stack). The
# stacks run at the same time; each one's output is printed when it ends.
#
# Each stack gets its own virtualenv under .venvs/, rebuilt when its requirements or pyproject.toml
# change (the newest stack also once a week, to pick up new releases). torch is installed first, so
# that nothing later resolves a different build: torch==2.13.0 by default (OMNIFIX_TORCH to change
# it). On Linux the public index's torch is the CUDA build; OMNIFIX_TORCH_INDEX=
# https://download.pytorch.org/whl/cpu installs the CPU build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${OMNIFIX_TORCH:-torch==2.13.0}
TORCH_INDEX=${OMNIFIX_TORCH_INDEX:-}
NEWEST=tf5
JOBS=${OMNIFIX_JOBS:-$(nproc)}
STACKS=${STACKS:-$(cd ci/stacks && ls *.txt | grep -v '\.nodeps\.txt$' | sed 's/\.txt$//' | tr '\n' ' ')}
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT

# pip install into a venv, keeping its exit status; drops pip's notes about local index folders.
pip_in() {
  local venv=$1
  shift
  "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

stamp_of() {
  local name=$1
  {
    cat "ci/stacks/$name.txt" pyproject.toml
    [[ ! -f ci/stacks/$name.nodeps.txt ]] || cat "ci/stacks/$name.nodeps.txt"
    # A stack that pins nothing is rebuilt each week, with the releases of that week.
    grep -qE '^[A-Za-z].*==' "ci/stacks/$name.txt" || date +%G-%V
  } | sha256sum | cut -c1-16
}

setup_stack() {
  local name=$1 venv=.venvs/$1
  local stamp
  stamp=$(stamp_of "$name")
  if [[ -f $venv/.omnifix-stamp && $(cat "$venv/.omnifix-stamp") == "$stamp" ]]; then
    return
  fi
  echo "== setting up $venv"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  # torch first, so that nothing later resolves a different (CUDA) build.
  pip_in "$venv" "$TORCH_SPEC" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  pip_in "$venv" -e ".[dev]" -r "ci/stacks/$name.txt"
  if [[ -f ci/stacks/$name.nodeps.txt ]]; then
    pip_in "$venv" --no-deps -r "ci/stacks/$name.nodeps.txt"
  fi
  echo "$stamp" >"$venv/.omnifix-stamp"
}

versions() {
  ".venvs/$1/bin/python" -c 'import transformers, accelerate, torch; print(f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, torch {torch.__version__}")'
}

run_stack() {
  local name=$1
  shift
  local selection=(-m "not any_stack")
  [[ $name != "$NEWEST" ]] || selection=(-n "$JOBS")
  echo "== pytest on $name ($(versions "$name")): ${selection[*]}"
  set +e
  ".venvs/$name/bin/python" -m pytest -p no:cacheprovider "${selection[@]}" "$@"
  local rc=$?
  set -e
  if [[ $rc -eq 5 ]]; then
    # pytest's "no tests collected": fine when the caller narrowed the selection, a defect otherwise.
    if [[ $# -gt 0 ]]; then echo "== $name: no test matched the selection"; rc=0; else rc=1; fi
  fi
  return $rc
}

start=$SECONDS
# Set up every stack at once (mostly downloads and unpacking), then test them at once.
for name in $STACKS; do
  setup_stack "$name" >"$LOGS/$name.setup" 2>&1 &
  echo $! >"$LOGS/$name.setup.pid"
done
failed=()
for name in $STACKS; do
  if ! wait "$(cat "$LOGS/$name.setup.pid")"; then
    cat "$LOGS/$name.setup"
    echo "== $name: setting up .venvs/$name failed"
    failed+=("$name")
    continue
  fi
  cat "$LOGS/$name.setup"
  run_stack "$name" "$@" >"$LOGS/$name.log" 2>&1 &
  echo $! >"$LOGS/$name.pid"
done
for name in $STACKS; do
  [[ -f $LOGS/$name.pid ]] || continue
  rc=0
  wait "$(cat "$LOGS/$name.pid")" || rc=$?
  cat "$LOGS/$name.log"
  [[ $rc -eq 0 ]] || failed+=("$name")
done

if [[ " $STACKS " == *" $NEWEST "* && -x .venvs/$NEWEST/bin/python ]]; then
  # New releases are tested here before omnifix says it supports them: doctor warns past the last
  # tested ones (omnifix._compat.NEWEST_TESTED), and so does this line.
  .venvs/$NEWEST/bin/python -c 'from omnifix._compat import untested_versions as u; print("\n".join(f"== note: {n} {v} is newer than omnifix._compat.NEWEST_TESTED; if every stack passed, raise it" for n, v in u().items()))'
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "== FAILED on: ${failed[*]} ($((SECONDS - start)) s)"
  exit 1
fi
echo "== all stacks passed: $STACKS($((SECONDS - start)) s)"
