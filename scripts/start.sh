#!/usr/bin/env bash
# Install mergecore into .venv and start it on the built-in demo (no downloads needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python launch.py "$@"
