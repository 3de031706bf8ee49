#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# mergekit 0.1.5 in its own virtualenv, for the side-by-side parity tests
if [ ! -x .venv-mergekit/bin/mergekit-yaml ]; then
  python3 -m venv .venv-mergekit
  .venv-mergekit/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv-mergekit/bin/python -m pip install -q --disable-pip-version-check mergekit==0.1.5 2>&1 | grep -v "^WARNING: Location" || true
fi
export MERGEKIT_PYTHON="$PWD/.venv-mergekit/bin/python" MERGECORE_REQUIRE_MERGEKIT=1
exec .venv/bin/python -m pytest -q "$@"
