#!/usr/bin/env bash
# Runs a training on an HPC allocation: one process per node (default) or per GPU.
#
# Usage: ibrun.sh [--dry-run] [--launcher ibrun|srun|mpirun] [--nodes N] [--per-gpu]
#                 [--gpus-per-node G] [--port P] [--hostfile FILE] -- TRAINER ARGS...
#
#   --launcher L        ibrun (TACC), srun (SLURM) or mpirun (Open MPI); default: the
#                       first of these on PATH
#   --nodes N           nodes to use (default: all of the allocation)
#   --per-gpu           one process per GPU, each seeing only its own GPU through
#                       CUDA_VISIBLE_DEVICES (default: one process per node, all its GPUs)
#   --gpus-per-node G   GPUs per node with --per-gpu (default: SLURM_GPUS_ON_NODE, else
#                       the count from nvidia-smi -L)
#   --port P            coordinator port on the first host (default: 12355)
#   --hostfile FILE     hosts, one per line, when there is no SLURM_JOB_NODELIST or
#                       PBS_NODEFILE (also given to mpirun)
#   --dry-run           print the environment and the launcher command, run nothing
#   -h, --help          print this help
#
# The coordinator is the allocation's first host, where the launchers put process 0:
# `scontrol show hostnames $SLURM_JOB_NODELIST`, else PBS_NODEFILE, else --hostfile, else
# this host (one node only). Every process gets BV_COORDINATOR_ADDRESS=host:port and
# BV_NUM_PROCESSES=nodes x processes per node; each takes its id from its launcher's rank
# variable at run time (big_vision/distributed.py). PYTHONPATH gets this repository, so
# run from anywhere, but relative --config/--workdir paths are relative to here.
# ibrun places processes as the allocation says: ask for them there (sbatch -N 4 -n 16).
#
# Example (4 nodes with 4 GPUs each):
#   salloc -N 4 --ntasks-per-node 4 --gres=gpu:4
#   bash ibrun.sh --per-gpu -- --config configs/ae_i1k.py:variant=B/4 --workdir DIR
set -euo pipefail

usage() {  # The header comment above, without the shebang and the leading "# ".
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

die_usage() {
  echo "ibrun.sh: $*" >&2
  echo "run 'ibrun.sh --help' for usage" >&2
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

positive_int() {  # NAME VALUE: exits with a usage error unless VALUE is a whole number > 0.
  if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$((10#$2))" -lt 1 ]; then
    die_usage "$1 '$2' is not a positive integer"
  fi
}

dry_run=0
launcher=""
nodes=""
per_gpu=0
gpus_per_node=""
port=12355
hostfile=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift; continue ;;
    --per-gpu) per_gpu=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    --launcher|--nodes|--gpus-per-node|--port|--hostfile)
      if [ $# -lt 2 ] || [ -z "$2" ] || [ "$2" = "--" ]; then die_usage "$1 needs a value"; fi ;;
    *) die_usage "unknown option '$1' (trainer arguments go after --)" ;;
  esac
  case "$1" in
    --launcher) launcher=$2 ;;
    --nodes) positive_int --nodes "$2"; nodes=$2 ;;
    --gpus-per-node) positive_int --gpus-per-node "$2"; gpus_per_node=$2 ;;
    --port) positive_int --port "$2"; port=$2 ;;
    --hostfile) hostfile=$2 ;;
  esac
  shift 2
done
if [ $# -eq 0 ]; then die_usage "no trainer arguments after -- (e.g. --config ... --workdir ...)"; fi
if [ "$port" -gt 65535 ]; then die_usage "--port '$port' is above 65535"; fi
if [ -n "$hostfile" ] && [ ! -r "$hostfile" ]; then die_usage "--hostfile '$hostfile' cannot be read"; fi

if [ -z "$launcher" ]; then
  for candidate in ibrun srun mpirun; do
    if command -v "$candidate" >/dev/null 2>&1; then launcher=$candidate; break; fi
  done
  if [ -z "$launcher" ]; then die_usage "none of ibrun, srun or mpirun is on PATH; pass --launcher"; fi
fi
case "$launcher" in
  ibrun|srun|mpirun) ;;
  *) die_usage "unknown launcher '$launcher'; use ibrun, srun or mpirun" ;;
esac

# The allocation's hosts in the launchers' order: process 0 runs on the first one.
hosts=()
allocated=""  # Number of hosts, where only the first one is known.
if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
  hosts_from="SLURM_JOB_NODELIST"
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  # No scontrol: a batch script runs on the allocation's first node, so this host is it.
  hosts_from="this host (SLURM_JOB_NODELIST without scontrol)"
  hosts=("$(hostname)")
  allocated=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
elif [ -n "${PBS_NODEFILE:-}" ] && [ -r "${PBS_NODEFILE:-}" ]; then
  hosts_from="PBS_NODEFILE"  # One line per slot: keep each host once, in order.
  mapfile -t hosts < <(awk 'NF && !seen[$1]++ {print $1}' "$PBS_NODEFILE")
elif [ -n "$hostfile" ]; then
  hosts_from="--hostfile"
  mapfile -t hosts < <(awk 'NF && $1 !~ /^#/ && !seen[$1]++ {print $1}' "$hostfile")
else
  hosts_from="this host"
  hosts=("$(hostname)")
fi
if [ ${#hosts[@]} -eq 0 ]; then
  echo "ibrun.sh: no hosts found in $hosts_from" >&2
  exit 1
fi
allocated=${allocated:-${#hosts[@]}}
nodes=${nodes:-$allocated}
if [ "$nodes" -gt "$allocated" ]; then
  die_usage "--nodes $nodes but $hosts_from has $allocated host(s): ${hosts[*]}"
fi

tasks_per_node=1
if [ "$per_gpu" -eq 1 ]; then
  if [ -z "$gpus_per_node" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
      gpus_per_node=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then
      gpus_per_node=$(nvidia-smi -L | grep -c '^GPU' || true)
    fi
    if ! [[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]]; then
      die_usage "--per-gpu needs --gpus-per-node (found no GPUs via SLURM_GPUS_ON_NODE or nvidia-smi)"
    fi
  fi
  tasks_per_node=$gpus_per_node
fi
num_processes=$((nodes * tasks_per_node))
coordinator="${hosts[0]}:$port"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
trainer=("$python" -m big_vision.train "$@")
if [ "$per_gpu" -eq 1 ]; then
  # Each process keeps only the GPU at its local rank (an index into the GPUs the
  # allocation already made visible, if it did). MPI's own variables come before SLURM's
  # because mpirun/ibrun inside a batch script leave the batch step's SLURM_LOCALID=0.
  # The quoted here-document is expanded later, by each process's own shell; its lines
  # are joined so that --dry-run prints the whole command on one line.
  read -r -d '' pick <<'EOF' || true
r=${OMPI_COMM_WORLD_LOCAL_RANK:-${MV2_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${SLURM_LOCALID:-0}}}};
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES";
r=${gpus[$r]:?"local rank $r but only CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"}; fi;
export CUDA_VISIBLE_DEVICES=$r; exec "$@"
EOF
  pick=${pick//$'\n'/ }
  trainer=(bash -c "$pick" per-gpu "${trainer[@]}")
fi

export BV_COORDINATOR_ADDRESS="$coordinator"
export BV_NUM_PROCESSES="$num_processes"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
case "$launcher" in
  srun)
    # A failing process ends the step instead of leaving the others waiting for it.
    command=(srun --nodes "$nodes" --ntasks "$num_processes" --ntasks-per-node "$tasks_per_node"
             --kill-on-bad-exit=1 --export=ALL "${trainer[@]}") ;;
  mpirun)
    # Open MPI's mpirun forwards only the variables named with -x.
    command=(mpirun -np "$num_processes" --map-by "ppr:$tasks_per_node:node")
    if [ "$hosts_from" = "--hostfile" ]; then command+=(--hostfile "$hostfile"); fi
    while read -r name; do
      if [[ "$name" =~ ^(BV_|JAX_|XLA_|TFDS_|TF_|WANDB_|NCCL_|PYTHON|PATH$|LD_LIBRARY_PATH$) ]]; then
        command+=(-x "$name")
      fi
    done < <(compgen -e | sort)
    command+=("${trainer[@]}") ;;
  ibrun)
    command=(ibrun -n "$num_processes" "${trainer[@]}") ;;
esac

echo "ibrun.sh: $launcher, $nodes node(s) x $tasks_per_node process(es), hosts from" \
  "$hosts_from, coordinator $coordinator" >&2
if [ "$dry_run" -eq 1 ]; then
  for name in BV_COORDINATOR_ADDRESS BV_NUM_PROCESSES PYTHONPATH; do
    printf '+ export %s=%s\n' "$name" "$(quote "${!name}")"
  done
  printf '+ %s\n' "$(quote "${command[@]}")"
else
  exec "${command[@]}"
fi
