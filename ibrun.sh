#!/usr/bin/env bash
# Runs a training on an HPC allocation: one process per node (default) or per GPU.
#
#   bash ibrun.sh [--dry-run] [--launcher ibrun|srun|mpirun] [--nodes N] [--per-gpu] \
#       [--gpus-per-node G] [--port P] -- --config configs/ae_i1k.py:variant=B/4 --workdir DIR
#
# Uses whichever launcher the site has (ibrun, then srun, then mpirun, unless --launcher).
# The coordinator is the allocation's first host (SLURM_JOB_NODELIST, PBS_NODEFILE or this
# host); its address and the process count reach every process as BV_COORDINATOR_ADDRESS
# and BV_NUM_PROCESSES, and each process takes its id from the launcher's rank variable
# (big_vision/distributed.py). --dry-run prints the environment and the command.
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
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

dry_run=0
launcher=""
nodes=""
per_gpu=0
gpus_per_node=""
port=12355
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --launcher) launcher="${2:?--launcher needs a value}"; shift ;;
    --nodes) nodes="${2:?--nodes needs a value}"; shift ;;
    --per-gpu) per_gpu=1 ;;
    --gpus-per-node) gpus_per_node="${2:?--gpus-per-node needs a value}"; shift ;;
    --port) port="${2:?--port needs a value}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "ibrun.sh: unknown option $1 (trainer arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [ $# -eq 0 ]; then
  echo "ibrun.sh: no trainer arguments after --" >&2
  exit 2
fi

if [ -z "$launcher" ]; then
  for candidate in ibrun srun mpirun; do
    if command -v "$candidate" >/dev/null 2>&1; then launcher=$candidate; break; fi
  done
fi
case "$launcher" in
  ibrun|srun|mpirun) ;;
  "") echo "ibrun.sh: none of ibrun, srun or mpirun is on PATH; pass --launcher" >&2; exit 2 ;;
  *) echo "ibrun.sh: unknown launcher '$launcher'; use ibrun, srun or mpirun" >&2; exit 2 ;;
esac

# The allocation's hosts, first one is the coordinator.
if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
elif [ -n "${PBS_NODEFILE:-}" ] && [ -f "${PBS_NODEFILE:-}" ]; then
  mapfile -t hosts < <(sort -u "$PBS_NODEFILE")
else
  hosts=("$(hostname)")
fi
nodes=${nodes:-${#hosts[@]}}

tasks_per_node=1
if [ "$per_gpu" -eq 1 ]; then
  if [ -z "$gpus_per_node" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
      gpus_per_node=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then
      gpus_per_node=$(nvidia-smi -L | wc -l)
    else
      echo "ibrun.sh: --per-gpu needs --gpus-per-node (no SLURM_GPUS_ON_NODE or nvidia-smi)" >&2
      exit 2
    fi
  fi
  tasks_per_node=$gpus_per_node
fi
num_processes=$((nodes * tasks_per_node))
coordinator="${hosts[0]}:$port"

python=${PYTHON:-python3}
if [ -x "$(dirname "$0")/.venv/bin/python" ]; then python="$(dirname "$0")/.venv/bin/python"; fi
trainer=("$python" -m big_vision.train "$@")
if [ "$per_gpu" -eq 1 ]; then
  # Each process sees only its own GPU: the launcher's local rank picks it.
  # shellcheck disable=SC2016  # Expanded by each process's own shell, not here.
  pick='export CUDA_VISIBLE_DEVICES=${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-${MV2_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-0}}}}; exec "$@"'
  trainer=(bash -c "$pick" _ "${trainer[@]}")
fi

case "$launcher" in
  srun) command=(srun --nodes "$nodes" --ntasks "$num_processes"
                 --ntasks-per-node "$tasks_per_node" --export=ALL "${trainer[@]}") ;;
  mpirun) command=(mpirun -np "$num_processes" --map-by "ppr:$tasks_per_node:node"
                   -x BV_COORDINATOR_ADDRESS -x BV_NUM_PROCESSES "${trainer[@]}") ;;
  ibrun) command=(ibrun -n "$num_processes" "${trainer[@]}") ;;
esac

export BV_COORDINATOR_ADDRESS="$coordinator"
export BV_NUM_PROCESSES="$num_processes"
if [ "$dry_run" -eq 1 ]; then
  echo "+ export BV_COORDINATOR_ADDRESS=$BV_COORDINATOR_ADDRESS"
  echo "+ export BV_NUM_PROCESSES=$BV_NUM_PROCESSES"
  show "${command[@]}"
else
  exec "${command[@]}"
fi
