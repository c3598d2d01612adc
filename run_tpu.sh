#!/usr/bin/env bash
# Runs a training on every worker of a Cloud TPU VM (pod slice) at once.
#
# Usage: run_tpu.sh [--dry-run] --tpu NAME --zone ZONE [--project P] [--tfds-data-dir DIR]
#                   [--repo-dir DIR] -- TRAINER ARGS...
#
#   --tpu NAME            the TPU VM (all of its workers run the training)
#   --zone ZONE           its zone, e.g. us-central2-b
#   --project P           its Google Cloud project (default: gcloud's configured one)
#   --tfds-data-dir DIR   TFDS_DATA_DIR on the workers, e.g. gs://BUCKET/tfds
#                         (default: this shell's TFDS_DATA_DIR, if set)
#   --repo-dir DIR        where the repository goes on each worker; relative paths are
#                         in the remote home (default: big_vision)
#   --dry-run             print every command, one per line after "+ ", run nothing
#   -h, --help            print this help
#
# Steps: (1) `git archive HEAD` of this repository (committed files only: uncommitted
# changes are not shipped), (2) `gcloud compute tpus tpu-vm scp --worker=all` of that
# archive to every worker, (3) unpacking it into --repo-dir and installing
# requirements.txt plus jax[tpu] into a virtual environment there (.venv, kept between
# runs), (4) `python -m big_vision.train TRAINER ARGS` on all workers at once via
# `gcloud compute tpus tpu-vm ssh --worker=all`, with BV_DISTRIBUTED=auto so that
# big_vision/distributed.py lets JAX find the other workers.
#
# Example:
#   bash run_tpu.sh --tpu my-v4-64 --zone us-central2-b --tfds-data-dir gs://BUCKET/tfds -- \
#       --config configs/ae_i1k.py:variant=B/4,size=64 --workdir gs://BUCKET/umd_b4
set -euo pipefail

usage() {  # The header comment above, without the shebang and the leading "# ".
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

die_usage() {
  echo "run_tpu.sh: $*" >&2
  echo "run 'run_tpu.sh --help' for usage" >&2
  exit 2
}

# Quotes words so that any POSIX shell (or Python's shlex.split) reads back exactly them:
# plain words stay as they are, others go in single quotes.
quote() {
  local word out=""
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
      out+=" $word"
    else
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "${out# }"
}

dry_run=0
tpu=""
zone=""
project=""
tfds_data_dir="${TFDS_DATA_DIR:-}"
repo_dir="big_vision"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    --tpu|--zone|--project|--tfds-data-dir|--repo-dir)
      if [ $# -lt 2 ] || [ -z "$2" ] || [ "$2" = "--" ]; then die_usage "$1 needs a value"; fi ;;
    *) die_usage "unknown option '$1' (trainer arguments go after --)" ;;
  esac
  case "$1" in
    --tpu) tpu=$2 ;;
    --zone) zone=$2 ;;
    --project) project=$2 ;;
    --tfds-data-dir) tfds_data_dir=$2 ;;
    --repo-dir) repo_dir=$2 ;;
  esac
  shift 2
done
missing=()
[ -n "$tpu" ] || missing+=("--tpu NAME")
[ -n "$zone" ] || missing+=("--zone ZONE")
if [ ${#missing[@]} -gt 0 ]; then die_usage "missing ${missing[*]}"; fi
if [ $# -eq 0 ]; then die_usage "no trainer arguments after -- (e.g. --config ... --workdir ...)"; fi

run() {
  if [ "$dry_run" -eq 1 ]; then
    printf '+ %s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

if [ "$dry_run" -eq 0 ] && ! command -v gcloud >/dev/null 2>&1; then
  echo "run_tpu.sh: gcloud is not on PATH (install the Google Cloud CLI)" >&2
  exit 1
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "run_tpu.sh: warning: uncommitted changes in $root are not shipped (HEAD is)" >&2
fi
if [ -z "$tfds_data_dir" ]; then
  echo "run_tpu.sh: warning: no --tfds-data-dir or TFDS_DATA_DIR; workers use TFDS's" \
    "default (tensorflow_datasets in their home directory)" >&2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
archive="$tmp/big_vision.tar.gz"
remote_archive="big_vision.tar.gz"  # In the remote home.

gcloud_args=(--zone "$zone" --worker=all)
if [ -n "$project" ]; then gcloud_args+=(--project "$project"); fi

# Remote commands are strings that each worker's login shell splits again: quote every
# value that comes from the user.
q_dir=$(quote "$repo_dir")
setup="mkdir -p $q_dir && tar xzf $remote_archive -C $q_dir && cd $q_dir"
# TPU VM images may lack python3-venv; install it when creating the venv fails.
setup+=" && { test -x .venv/bin/pip || python3 -m venv .venv || { sudo apt-get -qq update"
setup+=" && sudo apt-get -qq install -y python3-venv && python3 -m venv --clear .venv; }; }"
setup+=" && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]'"

launch="cd $q_dir && BV_DISTRIBUTED=auto"
if [ -n "$tfds_data_dir" ]; then launch+=" TFDS_DATA_DIR=$(quote "$tfds_data_dir")"; fi
launch+=" .venv/bin/python -m big_vision.train $(quote "$@")"

run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$tpu:$remote_archive" "${gcloud_args[@]}"
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command "$setup"
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command "$launch"
