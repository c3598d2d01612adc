#!/usr/bin/env bash
# Runs a training on every worker of a Cloud TPU VM (pod slice) at once.
#
#   bash run_tpu.sh --tpu NAME --zone ZONE [--project P] [--tfds-data-dir DIR] \
#       [--repo-dir DIR] [--dry-run] -- --config configs/ae_i1k.py:variant=B/4 --workdir DIR
#
# Ships the committed repository (git archive of HEAD) to every worker, installs the
# requirements and jax[tpu] in a virtual environment there, and launches
# `python -m big_vision.train ARGS` on all workers; JAX's distributed runtime finds the
# other workers itself (big_vision/distributed.py). --dry-run prints every command.
set -euo pipefail

# Prints a command so that a shell (or shlex.split) reads back exactly these words.
show() {
  local word out="+"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
      out+=" $word"
    else
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$out"
}

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

dry_run=0
tpu=""
zone=""
project=""
tfds_data_dir="${TFDS_DATA_DIR:-}"
repo_dir="big_vision"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --tpu) tpu="${2:?--tpu needs a value}"; shift ;;
    --zone) zone="${2:?--zone needs a value}"; shift ;;
    --project) project="${2:?--project needs a value}"; shift ;;
    --tfds-data-dir) tfds_data_dir="${2:?--tfds-data-dir needs a value}"; shift ;;
    --repo-dir) repo_dir="${2:?--repo-dir needs a value}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "run_tpu.sh: unknown option $1 (trainer arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
missing=()
[ -n "$tpu" ] || missing+=("--tpu NAME")
[ -n "$zone" ] || missing+=("--zone ZONE")
if [ ${#missing[@]} -gt 0 ]; then
  echo "run_tpu.sh: missing ${missing[*]}" >&2
  usage >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "run_tpu.sh: no trainer arguments after --" >&2
  exit 2
fi

run() {
  if [ "$dry_run" -eq 1 ]; then
    show "$@"
  else
    "$@"
  fi
}

gcloud_args=(--zone "$zone" --worker=all)
if [ -n "$project" ]; then gcloud_args+=(--project "$project"); fi

# The trainer's arguments, quoted for the remote shell.
trainer_args=$(printf ' %q' "$@")
env_prefix=""
if [ -n "$tfds_data_dir" ]; then env_prefix="TFDS_DATA_DIR=$(printf '%q' "$tfds_data_dir") "; fi

archive="/tmp/big_vision_$$.tar.gz"
run git -C "$(dirname "$0")" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$tpu:big_vision.tar.gz" "${gcloud_args[@]}"
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command \
  "mkdir -p $repo_dir && tar xzf big_vision.tar.gz -C $repo_dir && cd $repo_dir && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]'"
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command \
  "cd $repo_dir && ${env_prefix}.venv/bin/python -m big_vision.train$trainer_args"
