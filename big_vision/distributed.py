"""Starts JAX's distributed runtime as the platform needs, once, before any other JAX call.

Where the settings come from, first match wins:
  flags       --coordinator_address/--num_processes/--process_id given to the trainer;
  bv_env      BV_COORDINATOR_ADDRESS, BV_NUM_PROCESSES (and BV_PROCESS_ID, else the
              launcher's own rank variable), as set by ibrun.sh;
  tpu         a Cloud TPU VM (TPU_WORKER_HOSTNAMES / TPU_ACCELERATOR_TYPE): JAX finds
              everything itself;
  slurm       a SLURM step with more than one task: JAX's SLURM detection;
  mpi         OpenMPI / MVAPICH / PMI ranks with more than one process, the coordinator
              from MASTER_ADDR and MASTER_PORT;
  none        a single plain process: nothing to start.
"""
import dataclasses
import os
from typing import Mapping, Optional, Sequence

import jax

RANK_VARS = ("BV_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
             "MV2_COMM_WORLD_RANK")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclasses.dataclass
class Plan:
  source: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[Sequence[int]] = None


def _rank(env):
  for var in RANK_VARS:
    if env.get(var, "") != "":
      return int(env[var])
  return None


def plan(env: Mapping[str, str], coordinator_address=None, num_processes=None,
         process_id=None, local_device_ids=None) -> Plan:
  """Decides how to initialise from the environment and explicit settings (pure)."""
  if coordinator_address or num_processes or process_id is not None:
    missing = [n for n, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"explicit multi-process settings need all three; missing: "
                       f"{', '.join(missing)}")
    return Plan("flags", coordinator_address, int(num_processes), int(process_id),
                local_device_ids)
  if env.get("BV_COORDINATOR_ADDRESS"):
    rank = _rank(env)
    if rank is None or not env.get("BV_NUM_PROCESSES"):
      raise ValueError("BV_COORDINATOR_ADDRESS is set but BV_NUM_PROCESSES or a process id "
                       f"({', '.join(RANK_VARS)}) is missing")
    ids = env.get("BV_LOCAL_DEVICE_IDS")
    return Plan("bv_env", env["BV_COORDINATOR_ADDRESS"], int(env["BV_NUM_PROCESSES"]), rank,
                [int(i) for i in ids.split(",")] if ids else local_device_ids)
  if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_ACCELERATOR_TYPE"):
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or not hosts:  # A pod slice (or unknown): JAX reads the metadata.
      return Plan("tpu")
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
    return Plan("slurm")
  for var in SIZE_VARS:
    if int(env.get(var, "1")) > 1:
      if not env.get("MASTER_ADDR"):
        raise ValueError(f"{var}={env[var]} processes but no coordinator: set MASTER_ADDR "
                         "(and MASTER_PORT), or use ibrun.sh which sets them")
      address = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '12355')}"
      return Plan("mpi", address, int(env[var]), _rank(env))
  return Plan("none")


_STARTED = None


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               local_device_ids=None, env=None) -> Plan:
  """Starts jax.distributed per plan(); returns the plan. Safe to call more than once."""
  global _STARTED
  if _STARTED is not None:
    return _STARTED
  p = plan(os.environ if env is None else env, coordinator_address, num_processes,
           process_id, local_device_ids)
  if p.source != "none":
    # CPU collectives across processes need gloo; harmless on accelerators.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if p.source in ("tpu", "slurm"):
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(p.coordinator_address, p.num_processes, p.process_id,
                                 local_device_ids=p.local_device_ids)
  _STARTED = p
  return p
