#!/usr/bin/env bash
# The main job: installs (scripts/setup.sh), then trains UMD on Fashion-MNIST on the CPU.
# Extra arguments go to the trainer, e.g. --config configs/ae_fmnist.py:method=mae.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
WORKDIR=${WORKDIR:-workdirs/umd_fmnist}
if [ $# -eq 0 ]; then set -- --config configs/ae_fmnist.py; fi
.venv/bin/python -m big_vision.train --workdir "$WORKDIR" "$@"
