#!/usr/bin/env bash
# Creates .venv (if missing) with everything in requirements.txt, and installs Debian's
# Fashion-MNIST files when they are missing. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import jax, flax, optax, orbax.checkpoint, tensorflow, tensorflow_datasets, ml_collections, wandb, matplotlib, pytest" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
fi
