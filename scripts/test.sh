#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# chromium (Debian's package) for the browser tests; Playwright drives it, it downloads no browser
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 \
     && $SUDO apt-get update -qq >/dev/null 2>&1 \
     && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    echo "installed chromium for the browser tests"
  else
    echo "warning: could not install chromium with apt-get; the browser tests need it" >&2
  fi
fi
# mergekit 0.1.5 in its own virtualenv, for the side-by-side parity tests
if [ ! -x .venv-mergekit/bin/mergekit-yaml ]; then
  python3 -m venv .venv-mergekit
  .venv-mergekit/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv-mergekit/bin/python -m pip install -q --disable-pip-version-check mergekit==0.1.5 2>&1 | grep -v "^WARNING: Location" || true
fi
export MERGEKIT_PYTHON="$PWD/.venv-mergekit/bin/python" MERGECORE_REQUIRE_MERGEKIT=1 MERGECORE_REQUIRE_BROWSER=1 \
  MERGECORE_REQUIRE_MINILM=1
exec .venv/bin/python -m pytest -q "$@"
