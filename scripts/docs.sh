#!/usr/bin/env bash
# Builds the documentation site (mkdocs-material + mkdocstrings) into site/ with --strict, after
# running every `>>>` example of the pages in docs/ (the docstrings' examples run in the test suite).
#
#   bash scripts/docs.sh            # check the examples, then build site/
#   bash scripts/docs.sh serve      # live preview on http://127.0.0.1:8000 instead of building
#
# The virtualenv .venvs/docs is rebuilt only when its inputs change (like scripts/test.sh): torch
# 2.13.0 first, so that pip never resolves a multi-GB CUDA build (OMNIFIX_TORCH overrides), then
# omnifix with the newest supported stack (ci/stacks/tf5.txt), then the pinned doc tools.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1 # mkdocs-material's banner about its successor, printed on every build
PY=${PYTHON:-python3}
TORCH_SPEC=${OMNIFIX_TORCH:-torch==2.13.0}
venv=.venvs/docs

# The newest stack pins nothing: rebuilt each week, with that week's releases.
stamp=$({ cat ci/docs-requirements.txt ci/stacks/tf5.txt pyproject.toml; date +%G-%V; } | sha256sum | cut -c1-16)
stamp="$stamp $TORCH_SPEC"
if [[ ! -f $venv/.omnifix-stamp || $(cat "$venv/.omnifix-stamp") != "$stamp" ]]; then
  echo "== setting up $venv"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  pip_in() { "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
  pip_in --upgrade pip
  pip_in "$TORCH_SPEC"
  # transformers and accelerate as the newest stack has them (not its Xinference test dependencies).
  pip_in -e . -r <(grep -E '^(transformers|accelerate)\b' ci/stacks/tf5.txt) -r ci/docs-requirements.txt
  echo "$stamp" >"$venv/.omnifix-stamp"
fi

if [[ ${1:-} == serve ]]; then
  exec "$venv/bin/mkdocs" serve --strict
fi

echo "== examples in docs/*.md"
# Each page is one doctest session (its `>>>` blocks share names, top to bottom). Fenced blocks
# without `>>>` are illustrations (GPU code, say) and are not run.
HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error "$venv/bin/python" - <<'PY'
import doctest, pathlib, re, sys

# Fences may be indented (inside a list item); doctest handles indented examples.
fence = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
parser, failed = doctest.DocTestParser(), 0
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
for page in sorted(pathlib.Path("docs").rglob("*.md")):
    text, names, attempted, page_failed = page.read_text(encoding="utf-8"), {}, 0, 0
    for block in fence.finditer(text):
        if ">>>" not in block.group(1):
            continue
        line = text.count("\n", 0, block.start(1))  # so that failures name the page's line
        test = parser.get_doctest(block.group(1), {}, str(page), str(page), line)
        test.globs = names  # DocTest copies its globals; the page's blocks share one namespace
        result = runner.run(test, clear_globs=False)
        attempted, page_failed = attempted + result.attempted, page_failed + result.failed
    if attempted:
        print(f"   {page}: {attempted - page_failed}/{attempted} examples passed")
    failed += page_failed
sys.exit(1 if failed else 0)
PY

echo "== every export documented"
# docs/api.md links every name omnifix exports and has a reference entry for each (the errors' are
# on docs/errors.md) and for every name of omnifix.types; docs/errors.md has a row and a reference
# entry for every name of omnifix.errors: a new public name fails here until its documentation exists.
"$venv/bin/python" - <<'PY'
import pathlib, sys
import omnifix, omnifix.errors, omnifix.types

api, errors = (pathlib.Path(f"docs/{name}.md").read_text(encoding="utf-8") for name in ("api", "errors"))
missing = [f"docs/api.md: {name}" for name in omnifix.__all__ if f"`{name}`" not in api]
missing += [
    f"docs/api.md: ::: omnifix.{name}"
    for name in omnifix.__all__
    if name not in omnifix.errors.__all__ and name != "__version__"
    and f"::: omnifix.{name}\n" not in api
]
missing += [
    f"docs/api.md: ::: omnifix.types.{name}"
    for name in omnifix.types.__all__
    if f"::: omnifix.types.{name}\n" not in api
]
missing += [
    f"docs/errors.md: {name}"
    for name in omnifix.errors.__all__
    if f"| `{name}` |" not in errors or f"::: omnifix.errors.{name}\n" not in errors
]
print("\n".join(f"   undocumented: {entry}" for entry in missing) or "   all documented")
sys.exit(1 if missing else 0)
PY

echo "== mkdocs build --strict"
start=$SECONDS
"$venv/bin/mkdocs" build --strict --site-dir site
echo "== site/ built in $((SECONDS - start)) s"
