#!/usr/bin/env bash
# The main job: installs (scripts/setup.sh), trains the Fashion-MNIST feature network for
# FID/IS once if its weights are missing (about 2 minutes), then trains UMD on
# Fashion-MNIST on the CPU. Extra arguments go to the trainer, e.g.
#   bash scripts/train_fmnist.sh --config configs/ae_fmnist.py:method=mae
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
FEATURE_NET=${FEATURE_NET:-$HOME/.cache/big_vision/fmnist_classifier.npz}
if [ ! -f "$FEATURE_NET" ]; then
  .venv/bin/python -m big_vision.tools.train_feature_net --out "$FEATURE_NET"
fi
WORKDIR=${WORKDIR:-workdirs/umd_fmnist}
if [ $# -eq 0 ]; then set -- --config configs/ae_fmnist.py; fi
.venv/bin/python -m big_vision.train --workdir "$WORKDIR" "$@"
