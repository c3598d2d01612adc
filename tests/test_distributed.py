"""Where multi-process settings come from, for every kind of cluster (pure decisions)."""
import pytest

from big_vision import distributed


def test_single_process_needs_nothing():
  assert distributed.plan({}).source == "none"
  assert distributed.plan({"SLURM_JOB_ID": "3", "SLURM_NTASKS": "1"}).source == "none"


def test_explicit_flags_win():
  p = distributed.plan({"SLURM_JOB_ID": "3", "SLURM_NTASKS": "8"},
                       coordinator_address="h:1", num_processes=2, process_id=1)
  assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == ("flags", "h:1", 2, 1)
  with pytest.raises(ValueError, match="missing: process_id"):
    distributed.plan({}, coordinator_address="h:1", num_processes=2)


def test_our_env_with_launcher_ranks():
  env = {"BV_COORDINATOR_ADDRESS": "n1:12355", "BV_NUM_PROCESSES": "8"}
  for rank_var in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"):
    p = distributed.plan(dict(env, **{rank_var: "5"}))
    assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == (
        "bv_env", "n1:12355", 8, 5)
  with pytest.raises(ValueError, match="process id"):
    distributed.plan(env)


def test_tpu_pod_and_slurm_use_jax_detection():
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}).source == "tpu"
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a"}).source == "none"  # One host.
  assert distributed.plan({"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4"}).source == "slurm"


def test_mpi_needs_a_coordinator():
  p = distributed.plan({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
                        "MASTER_ADDR": "n3", "MASTER_PORT": "999"})
  assert (p.source, p.coordinator_address, p.num_processes, p.process_id) == (
      "mpi", "n3:999", 4, 2)
  with pytest.raises(ValueError, match="MASTER_ADDR"):
    distributed.plan({"PMI_SIZE": "2", "PMI_RANK": "0"})
