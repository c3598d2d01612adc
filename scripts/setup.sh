#!/usr/bin/env bash
# Creates .venv (if missing) with everything in requirements.txt, and installs Debian's
# Fashion-MNIST files and jemalloc when they are missing. Safe to run again: pip runs only when
# requirements.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: the Fashion-MNIST files, and jemalloc (XLA:CPU steps run ~25% faster
# under it; see big_vision/host_allocator.py).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
    || ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist libjemalloc2
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
