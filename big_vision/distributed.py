"""Starts JAX's distributed runtime as the platform needs, once, before any other JAX call.

`plan(env, ...)` decides from the environment alone (pure, so tests can feed it fake
clusters); `initialize(...)` carries the decision out. Where the settings come from, the
first match wins:

  flags     explicit arguments (the trainer's --coordinator_address/--num_processes/
            --process_id); a missing one is taken from the environment below.
  bv_env    BV_COORDINATOR_ADDRESS ("host:port"), as set by ibrun.sh, with
            BV_NUM_PROCESSES and BV_PROCESS_ID, each falling back to the launcher's own
            size/rank variable (SLURM, Open MPI, MVAPICH, PMI); BV_LOCAL_DEVICE_IDS
            ("0,1") optionally picks this process's accelerators.
  auto      BV_DISTRIBUTED=auto (run_tpu.sh sets it): JAX detects everything itself. Use it
            on Cloud TPU VMs, whose settings live in the metadata server, not the environment.
  tpu       TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES naming more than one host (GKE):
            JAX detects everything itself.
  openmpi, mvapich, pmi, slurm
            a launcher started more than one process: the size and rank come from its
            variables (OMPI_COMM_WORLD_*, MV2_COMM_WORLD_*, PMI_*, SLURM_* inside an srun
            step); the coordinator from MASTER_ADDR[:MASTER_PORT], else the first host of
            the srun step (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST) on a port derived
            from the job id the way JAX's own SLURM detection does, else (Open MPI's mpirun)
            mpirun's own address from OMPI_MCA_orte_hnp_uri, as JAX's detection reads it.
            JAX's detection itself is not used here: it would also pin every process to
            the one GPU at its local rank, even with one process per node (jax#16788).
  none      a single plain process (or BV_DISTRIBUTED=off): nothing to start.
"""
import dataclasses
import logging
import os
import re
from typing import Mapping, Optional, Sequence, Tuple

import jax

# Our own variables (ibrun.sh sets the first two; the rest are optional).
COORDINATOR_VAR = "BV_COORDINATOR_ADDRESS"
NUM_PROCESSES_VAR = "BV_NUM_PROCESSES"
PROCESS_ID_VAR = "BV_PROCESS_ID"
LOCAL_DEVICE_IDS_VAR = "BV_LOCAL_DEVICE_IDS"
MODE_VAR = "BV_DISTRIBUTED"  # "auto": let JAX detect; "off": never start.

DEFAULT_PORT = 12355  # With MASTER_ADDR but no MASTER_PORT; ibrun.sh's default too.


@dataclasses.dataclass(frozen=True)
class Launcher:
  """Where one kind of launcher puts a process's size, rank and place on its node."""
  name: str
  size: str
  rank: str
  local_rank: str
  local_size: str


# Order matters: MPI launchers started from inside a SLURM batch script (TACC's ibrun,
# mpirun) leave the batch step's SLURM_PROCID=0 in every process, so their own variables
# must win over SLURM's.
LAUNCHERS = (
    Launcher("openmpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
             "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    Launcher("mvapich", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
             "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    Launcher("pmi", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    # SLURM_STEP_NUM_TASKS exists only inside an srun step: a batch script or an ssh session
    # on an allocated node has SLURM_NTASKS too but is a single process (jax#30073).
    Launcher("slurm", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID",
             "SLURM_STEP_TASKS_PER_NODE"),
)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What initialize() does. None fields are left to JAX's own cluster detection."""
  source: str  # flags, bv_env, auto, tpu, openmpi, mvapich, pmi, slurm, external, none.
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[Tuple[int, ...]] = None

  @property
  def multi_process(self) -> bool:
    return self.source != "none"

  @property
  def complete(self) -> bool:
    """All of coordinator, count and id are known: JAX need not detect anything."""
    return None not in (self.coordinator_address, self.num_processes, self.process_id)


def _int(env, var) -> Optional[int]:
  value = env.get(var, "")
  if value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{var}={value!r} is not an integer") from None


def _device_ids(value, what) -> Optional[Tuple[int, ...]]:
  if value is None or value == "":
    return None
  if isinstance(value, int):
    return (value,)
  try:
    return tuple(int(i) for i in (value.split(",") if isinstance(value, str) else value))
  except ValueError:
    raise ValueError(f"{what}={value!r} is not a comma-separated list of integers") from None


def _launcher(env) -> Optional[Launcher]:
  """The launcher that started several processes, if any."""
  for launcher in LAUNCHERS:
    size = _int(env, launcher.size)
    if size is not None and size > 1 and env.get(launcher.rank, "") != "":
      return launcher
  return None


def first_host(nodelist: str) -> str:
  """First host of a SLURM node list: "gpu-[07-09,12],cpu1" -> "gpu-07"."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):  # The first entry ends at a comma outside brackets.
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      end = i
      break
  entry = nodelist[:end].strip()
  # Every bracketed range list contributes its first value ("rack[1-2]-n[01-04]": rack1-n01).
  host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)
  if not host or "[" in host or "]" in host:
    raise ValueError(f"cannot read the first host of the SLURM node list {nodelist!r}")
  return host


def _job_port(env, job_id: int) -> str:
  """The coordinator port: MASTER_PORT or JAX_COORDINATOR_PORT if set, else the one JAX's
  own cluster detection picks, in [61440, 65535] and different for neighbouring jobs."""
  return (env.get("MASTER_PORT") or env.get("JAX_COORDINATOR_PORT")
          or str(job_id % 2**12 + 65535 - 2**12 + 1))


def _slurm_coordinator(env) -> str:
  """Process 0 runs on the first host of the srun step."""
  nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
  return f"{first_host(nodelist)}:{_job_port(env, _int(env, 'SLURM_JOB_ID') or 0)}"


def _open_mpi_coordinator(env) -> str:
  """Open MPI's mpirun runs on process 0's host (with its default mapping) and tells every
  process its address: "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"."""
  uri = env["OMPI_MCA_orte_hnp_uri"]
  job = re.match(r"(\d+)\.", uri)
  ipv4 = re.search(r"tcp://([^,:]+)", uri)
  ipv6 = re.search(r"tcp6://\[([^,\]]+)", uri)
  if job is None or (ipv4 or ipv6) is None:
    raise ValueError(f"cannot read mpirun's address from OMPI_MCA_orte_hnp_uri={uri!r}; "
                     "set MASTER_ADDR")
  host = ipv4.group(1) if ipv4 else f"[{ipv6.group(1)}]"
  job_id = int(job.group(1)) // 2**12  # Open MPI job ids are multiples of 2**12.
  return f"{host}:{_job_port(env, job_id)}"


def _local_device_ids(env, launcher: Launcher) -> Optional[Tuple[int, ...]]:
  """This process's accelerator when a node runs several processes that all see all of them.

  JAX's own SLURM/MPI detection always restricts a process to device [local rank], which
  leaves all but one GPU idle with one process per node (jax#16788) and picks a wrong
  device when the launcher already gave each process its own (CUDA_VISIBLE_DEVICES=3).
  """
  local_rank = _int(env, launcher.local_rank)
  if local_rank is None:
    return None
  local_size = env.get(launcher.local_size, "")
  if launcher.name == "slurm":  # "4(x3)" or "2,1": tasks on each node; any above one counts.
    counts = [int(c) for c in re.findall(r"(\d+)(?:\(x\d+\))?", local_size)]
    per_node = max(counts) if counts else 1
  else:
    per_node = int(local_size) if local_size.isdigit() else 1
  if per_node <= 1:
    return None
  for var in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
    visible = env.get(var)
    if visible is not None and len([d for d in visible.split(",") if d]) < per_node:
      return None  # The launcher bound devices to processes itself.
  return (local_rank,)


def _from_env(env: Mapping[str, str]) -> Plan:
  mode = env.get(MODE_VAR, "").strip().lower()
  if mode not in ("", "auto", "off"):
    raise ValueError(f"{MODE_VAR}={env[MODE_VAR]!r}: use 'auto' (JAX detects the cluster) or "
                     "'off' (single process)")
  if mode == "off":
    return Plan("none")
  launcher = _launcher(env)

  if env.get(COORDINATOR_VAR):
    num = _int(env, NUM_PROCESSES_VAR)
    pid = _int(env, PROCESS_ID_VAR)
    if launcher is not None:
      launched = _int(env, launcher.size)
      if num is not None and num != launched:
        raise ValueError(f"{NUM_PROCESSES_VAR}={num} but the launcher started "
                         f"{launcher.size}={launched} processes")
      num = launched if num is None else num
      pid = _int(env, launcher.rank) if pid is None else pid
    if pid is None and num == 1:  # One process (ibrun.sh on one node): no rank to read.
      pid = 0
    missing = [v for v, x in ((NUM_PROCESSES_VAR, num), (PROCESS_ID_VAR, pid)) if x is None]
    if missing:
      raise ValueError(f"{COORDINATOR_VAR}={env[COORDINATOR_VAR]} is set but "
                       f"{' and '.join(missing)} is not, and no launcher rank variable "
                       f"({', '.join(l.rank for l in LAUNCHERS)}) says it")
    if num < 1:
      raise ValueError(f"{NUM_PROCESSES_VAR}={num} must be at least 1")
    if not 0 <= pid < num:
      raise ValueError(f"{PROCESS_ID_VAR}: process_id={pid} is not in [0, num_processes={num})")
    ids = _device_ids(env.get(LOCAL_DEVICE_IDS_VAR), LOCAL_DEVICE_IDS_VAR)
    return Plan("bv_env", env[COORDINATOR_VAR], num, pid, ids)

  if mode == "auto":
    return Plan("auto")
  tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in tpu_hosts.split(",") if h]) > 1:
    return Plan("tpu")
  if launcher is None:
    return Plan("none")

  num, pid = _int(env, launcher.size), _int(env, launcher.rank)
  ids = _local_device_ids(env, launcher)
  if env.get("MASTER_ADDR"):
    coordinator = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT') or DEFAULT_PORT}"
  elif env.get("SLURM_STEP_NODELIST"):  # srun started us, possibly through PMI: same hosts.
    coordinator = _slurm_coordinator(env)
  elif launcher.name == "openmpi" and env.get("OMPI_MCA_orte_hnp_uri"):
    coordinator = _open_mpi_coordinator(env)
  else:
    raise ValueError(f"{launcher.size}={num} processes but no coordinator: set MASTER_ADDR "
                     f"(and MASTER_PORT, default {DEFAULT_PORT}) to process 0's host, or "
                     "start through ibrun.sh, which sets BV_COORDINATOR_ADDRESS")
  return Plan(launcher.name, coordinator, num, pid, ids)


def plan(env: Mapping[str, str], coordinator_address: Optional[str] = None,
         num_processes: Optional[int] = None, process_id: Optional[int] = None,
         local_device_ids: Optional[Sequence[int]] = None) -> Plan:
  """Decides how to start JAX's distributed runtime; reads nothing but its arguments.

  Explicit arguments win over the environment, field by field. Raises ValueError, naming
  the bad value, when the settings are contradictory or incomplete.
  """
  ids = _device_ids(local_device_ids, "local_device_ids")
  explicit = (coordinator_address, num_processes, process_id)
  try:
    from_env = _from_env(env)
  except ValueError:
    if None in explicit:  # The environment was needed after all.
      raise
    from_env = Plan("none")  # Fully explicit: a confusing environment does not matter.
  if explicit == (None, None, None):
    return dataclasses.replace(from_env, local_device_ids=ids) if ids else from_env
  result = Plan(
      "flags",
      coordinator_address if coordinator_address is not None else from_env.coordinator_address,
      int(num_processes) if num_processes is not None else from_env.num_processes,
      int(process_id) if process_id is not None else from_env.process_id,
      ids or from_env.local_device_ids)
  # On TPUs JAX can fill in the rest; elsewhere nothing can.
  if not result.complete and from_env.source not in ("auto", "tpu"):
    missing = [name for name, value in (("coordinator_address", result.coordinator_address),
                                        ("num_processes", result.num_processes),
                                        ("process_id", result.process_id)) if value is None]
    raise ValueError(f"explicit multi-process settings are incomplete (environment: "
                     f"{from_env.source}); missing: {', '.join(missing)}")
  if result.num_processes is not None and result.num_processes < 1:
    raise ValueError(f"num_processes={result.num_processes} must be at least 1")
  if result.complete and not 0 <= result.process_id < result.num_processes:
    raise ValueError(f"process_id={result.process_id} is not in [0, "
                     f"num_processes={result.num_processes})")
  return result


_started: Optional[Plan] = None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None) -> Plan:
  """Starts jax.distributed per plan(os.environ, ...) and returns the plan.

  Call it before any other JAX call. Later calls return the first plan, unless they ask
  for a different multi-process set-up, which is an error: the runtime starts only once.
  """
  global _started
  p = plan(os.environ, coordinator_address, num_processes, process_id, local_device_ids)
  if _started is not None:
    if p.multi_process and p != _started:
      raise RuntimeError(f"distributed runtime already set up as {_started}; cannot redo it "
                         f"as {p}")
    return _started
  already = getattr(jax.distributed, "is_initialized", lambda: False)()
  if p.multi_process and already:
    p = Plan("external")  # Someone called jax.distributed.initialize already: keep theirs.
  elif p.multi_process:
    # Cross-process computations on the CPU backend need a collectives library; gloo works
    # on these machines (and is JAX's default since 0.4.3x; older versions had none).
    # Accelerator backends ignore the setting. A user's explicit choice (e.g. mpi) stays.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if p.complete:
      # Nothing left to detect; also stops JAX from adding local_device_ids of its own.
      kwargs["cluster_detection_method"] = "deactivate"
    logging.info("Starting JAX distributed runtime: %s", p)
    jax.distributed.initialize(p.coordinator_address, p.num_processes, p.process_id,
                               local_device_ids=p.local_device_ids, **kwargs)
  _started = p
  return p
