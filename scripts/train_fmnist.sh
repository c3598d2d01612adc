#!/usr/bin/env bash
# The main job: installs (scripts/setup.sh), trains the Fashion-MNIST feature network for
# FID/IS once if its weights are missing (about 2 minutes), then trains UMD on
# Fashion-MNIST on the CPU in WORKDIR (default workdirs/umd_fmnist). Extra arguments go
# to the trainer (without a --config, overrides of the default one); give another method
# its own WORKDIR, e.g.
#   WORKDIR=workdirs/mae_fmnist bash scripts/train_fmnist.sh --config configs/ae_fmnist.py:method=mae
# FEATURE_NET=PATH keeps the feature network elsewhere: an ae_fmnist --config that does
# not set feature_net= gets it added, so that the FID/IS evals find it there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
FEATURE_NET=${FEATURE_NET:-$HOME/.cache/big_vision/fmnist_classifier.npz}
if [ ! -f "$FEATURE_NET" ]; then
  .venv/bin/python -m big_vision.tools.train_feature_net --out "$FEATURE_NET"
fi
WORKDIR=${WORKDIR:-workdirs/umd_fmnist}

with_feature_net() {  # CONFIG_SPEC: adds feature_net=FEATURE_NET to ae_fmnist's options.
  local file=${1%%:*} options=""
  [[ $1 != *:* ]] || options=${1#*:}
  if [[ $(basename "$file") != ae_fmnist.py || $options == *feature_net=* ]]; then
    printf '%s' "$1"
  else  # Quoted: the config string splits on commas.
    printf '%s' "$file:${options:+$options,}feature_net='$FEATURE_NET'"
  fi
}

# Without a --config, the default one (extra arguments then override its fields).
has_config=0
for arg in "$@"; do
  case $arg in --config|--config=*) has_config=1 ;; esac
done
if [ $has_config -eq 0 ]; then set -- --config configs/ae_fmnist.py "$@"; fi
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --config)
      args+=("$1")
      if [ $# -gt 1 ]; then args+=("$(with_feature_net "$2")"); shift; fi
      shift ;;
    --config=*) args+=("--config=$(with_feature_net "${1#--config=}")"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
.venv/bin/python -m big_vision.train --workdir "$WORKDIR" "${args[@]}"
