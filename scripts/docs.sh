#!/usr/bin/env bash
# Build the documentation site (mkdocs.yml, docs/) with --strict: a broken link or anchor, a page missing from
# the nav, a snippet that does not exist or a docstring mkdocstrings cannot read fails the build. Installs the
# docs extra into the venv (./.venv, or $KD_VENV) first. CI runs this (.ci/run).
#   bash scripts/docs.sh              # build into a temporary directory, removed afterwards
#   bash scripts/docs.sh site         # build into ./site (git-ignored)
#   .venv/bin/mkdocs serve            # preview at http://127.0.0.1:8000, rebuilt on every edit
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KD_VENV:-.venv}"
bash scripts/install.sh docs
out="${1:-}"
if [ -z "$out" ]; then
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi
# The config reference is generated from conf/: a stale page fails here too (tests/test_readme.py checks it as well).
"$venv/bin/python" scripts/config_reference.py --check
NO_MKDOCS_2_WARNING=1 "$venv/bin/mkdocs" build --strict --site-dir "$out"
