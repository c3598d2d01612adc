"""big_vision.distributed: where multi-process settings come from on every kind of cluster
(plan() on fake environments), what initialize() hands to JAX, and two real processes."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from big_vision import distributed
from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fields(p):
  return (p.source, p.coordinator_address, p.num_processes, p.process_id, p.local_device_ids)


def test_single_plain_process_starts_nothing():
  assert _fields(distributed.plan({})) == ("none", None, None, None, None)
  assert not distributed.plan({}).multi_process
  # A batch script or an ssh session inside a SLURM allocation is one process, whatever
  # SLURM_NTASKS says: only srun steps (SLURM_STEP_NUM_TASKS) run several (jax#30073).
  assert distributed.plan({"SLURM_JOB_ID": "3", "SLURM_NTASKS": "8", "SLURM_PROCID": "0",
                           "SLURM_JOB_NODELIST": "n[1-2]"}).source == "none"
  assert distributed.plan({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}).source == "none"
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "t1v-0"}).source == "none"  # One host.
  # BV_DISTRIBUTED=off wins over launchers.
  assert distributed.plan({"BV_DISTRIBUTED": "off", "PMI_SIZE": "2", "PMI_RANK": "1"}).source == "none"


def test_tpu_uses_jax_detection():
  assert _fields(distributed.plan({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3",
                                   "TPU_WORKER_ID": "2"})) == ("tpu", None, None, None, None)
  assert distributed.plan({"TPU_PROCESS_ADDRESSES": "a:8476,b:8476"}).source == "tpu"
  # Cloud TPU VMs keep their settings in the metadata server: run_tpu.sh says "auto".
  p = distributed.plan({"BV_DISTRIBUTED": "auto"})
  assert p.source == "auto" and p.multi_process and not p.complete
  with pytest.raises(ValueError, match="BV_DISTRIBUTED='yes'"):
    distributed.plan({"BV_DISTRIBUTED": "yes"})


def test_slurm_step():
  env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
         "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
         "SLURM_STEP_NODELIST": "gpu-[07-08]", "SLURM_JOB_NODELIST": "gpu-[03,07-08]"}
  # First host of the step; JAX's own port for the job (4242 % 4096 + 61440).
  assert _fields(distributed.plan(env)) == ("slurm", "gpu-07:61586", 8, 5, (1,))
  # The launcher bound one GPU to each task already: no further restriction.
  assert distributed.plan(dict(env, CUDA_VISIBLE_DEVICES="1")).local_device_ids is None
  assert distributed.plan(dict(env, CUDA_VISIBLE_DEVICES="0,1,2,3")).local_device_ids == (1,)
  # One task per node keeps all the node's GPUs (JAX alone would keep only GPU 0).
  one_per_node = dict(env, SLURM_STEP_TASKS_PER_NODE="1(x8)", SLURM_LOCALID="0")
  assert distributed.plan(one_per_node).local_device_ids is None
  assert distributed.plan(dict(env, MASTER_PORT="999")).coordinator_address == "gpu-07:999"


@pytest.mark.parametrize("nodelist,first", [
    ("node001", "node001"), ("node001,host2", "node001"), ("gpu-node-[07-09]", "gpu-node-07"),
    ("n[001,007-015],h2", "n001"), ("rack[2-3]-n[04-05]", "rack2-n04"), ("c[9,10]", "c9")])
def test_first_host_of_slurm_node_lists(nodelist, first):
  assert distributed.first_host(nodelist) == first


def test_open_mpi():
  env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
         "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
         "MASTER_ADDR": "n3", "MASTER_PORT": "999"}
  assert _fields(distributed.plan(env)) == ("openmpi", "n3:999", 4, 2, None)
  no_port = {k: v for k, v in env.items() if k != "MASTER_PORT"}
  assert distributed.plan(no_port).coordinator_address == "n3:12355"
  # Without MASTER_ADDR, mpirun's own address (where process 0 runs), on JAX's port for it.
  uri = {k: v for k, v in env.items() if not k.startswith("MASTER")}
  uri["OMPI_MCA_orte_hnp_uri"] = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
  assert _fields(distributed.plan(uri)) == ("openmpi", "10.96.0.1:62624", 4, 2, None)
  uri["OMPI_MCA_orte_hnp_uri"] = "1314521088.0;tcp6://[fe80::b9b:ac5d,2620:10d::2]:43370"
  assert distributed.plan(uri).coordinator_address == "[fe80::b9b:ac5d]:62880"
  uri["OMPI_MCA_orte_hnp_uri"] = "garbage"
  with pytest.raises(ValueError, match="OMPI_MCA_orte_hnp_uri='garbage'"):
    distributed.plan(uri)
  # mpirun inside a SLURM batch script: the batch step's SLURM_PROCID=0 must not win.
  batch = dict(env, SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_NTASKS="4")
  assert distributed.plan(batch).process_id == 2


def test_mvapich_and_pmi_as_under_tacc_ibrun():
  env = {"MV2_COMM_WORLD_SIZE": "16", "MV2_COMM_WORLD_RANK": "9",
         "MV2_COMM_WORLD_LOCAL_RANK": "1", "MV2_COMM_WORLD_LOCAL_SIZE": "4",
         "MASTER_ADDR": "c401-001", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"}
  assert _fields(distributed.plan(env)) == ("mvapich", "c401-001:12355", 16, 9, (1,))
  pmi = {"PMI_SIZE": "2", "PMI_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
  assert _fields(distributed.plan(pmi)) == ("pmi", "h:5", 2, 1, None)
  # srun --mpi=pmi2 sets PMI_* without MASTER_ADDR: the step's first host is process 0's.
  srun_pmi = {"PMI_SIZE": "2", "PMI_RANK": "0", "SLURM_JOB_ID": "1",
              "SLURM_STEP_NODELIST": "a[5-6]", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}
  assert distributed.plan(srun_pmi).coordinator_address == "a5:61441"
  with pytest.raises(ValueError, match="PMI_SIZE=2 processes but no coordinator: set MASTER_ADDR"):
    distributed.plan({"PMI_SIZE": "2", "PMI_RANK": "0"})
  with pytest.raises(ValueError, match="MV2_COMM_WORLD_RANK='x' is not an integer"):
    distributed.plan({"MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_RANK": "x"})


def test_our_env_vars_with_each_launchers_rank():
  env = {"BV_COORDINATOR_ADDRESS": "n1:12355", "BV_NUM_PROCESSES": "8"}
  for size_var, rank_var in (("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
                             ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                             ("PMI_SIZE", "PMI_RANK"),
                             ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")):
    p = distributed.plan(dict(env, **{size_var: "8", rank_var: "5"}))
    assert _fields(p) == ("bv_env", "n1:12355", 8, 5, None), rank_var
  full = dict(env, BV_PROCESS_ID="3", BV_LOCAL_DEVICE_IDS="0,1")
  assert _fields(distributed.plan(full)) == ("bv_env", "n1:12355", 8, 3, (0, 1))
  # Without BV_NUM_PROCESSES the launcher's size serves.
  p = distributed.plan({"BV_COORDINATOR_ADDRESS": "n1:1", "PMI_SIZE": "4", "PMI_RANK": "3"})
  assert (p.num_processes, p.process_id) == (4, 3)
  with pytest.raises(ValueError, match="BV_PROCESS_ID is not"):
    distributed.plan(env)
  with pytest.raises(ValueError, match="BV_NUM_PROCESSES=8 but the launcher started "
                     "OMPI_COMM_WORLD_SIZE=4"):
    distributed.plan(dict(env, OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="0"))
  with pytest.raises(ValueError, match=r"BV_NUM_PROCESSES='eight' is not an integer"):
    distributed.plan(dict(env, BV_NUM_PROCESSES="eight", BV_PROCESS_ID="0"))
  with pytest.raises(ValueError, match=r"process_id=8 is not in \[0, num_processes=8\)"):
    distributed.plan({}, "h:1", 8, 8)


def test_explicit_arguments_win():
  slurm = {"SLURM_JOB_ID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "6",
           "SLURM_STEP_NODELIST": "n[1-2]", "BV_COORDINATOR_ADDRESS": "x:1"}
  p = distributed.plan(slurm, coordinator_address="h:1", num_processes=2, process_id=1)
  assert _fields(p) == ("flags", "h:1", 2, 1, None)
  # Field by field: the launcher still gives what was not said.
  p = distributed.plan({"PMI_SIZE": "4", "PMI_RANK": "3", "MASTER_ADDR": "m"},
                       coordinator_address="h:2")
  assert _fields(p) == ("flags", "h:2", 4, 3, None)
  # Complete arguments make a broken environment irrelevant.
  assert distributed.plan({"PMI_SIZE": "2", "PMI_RANK": "0"}, "h:1", 2, 0).source == "flags"
  with pytest.raises(ValueError, match="missing: process_id"):
    distributed.plan({}, coordinator_address="h:1", num_processes=2)
  p = distributed.plan({}, "h:1", 1, 0, local_device_ids=[2, 3])
  assert p.local_device_ids == (2, 3) and p.complete


@pytest.fixture
def fresh(monkeypatch):
  """initialize() from scratch, in a clean environment, with a recording fake JAX."""
  for name in list(os.environ):
    if name.startswith(("BV_", "SLURM_", "OMPI_", "PMI_", "MV2_", "TPU_", "MASTER_")):
      monkeypatch.delenv(name)
  monkeypatch.setattr(distributed, "_started", None)
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
  return calls


def test_initialize_single_process_calls_nothing(fresh):
  assert distributed.initialize().source == "none"
  assert distributed.initialize(None, None, None).source == "none"
  assert fresh == []


def test_initialize_passes_the_plan_once(fresh, monkeypatch):
  monkeypatch.setenv("BV_COORDINATOR_ADDRESS", "h:7")
  monkeypatch.setenv("BV_NUM_PROCESSES", "2")
  monkeypatch.setenv("BV_PROCESS_ID", "1")
  p = distributed.initialize()
  assert fresh == [(("h:7", 2, 1), {"local_device_ids": None,
                                    "cluster_detection_method": "deactivate"})]
  assert distributed.initialize() is p and len(fresh) == 1  # Once only.
  with pytest.raises(RuntimeError, match="already set up"):
    distributed.initialize("other:1", 2, 0)


def test_initialize_auto_leaves_detection_to_jax(fresh, monkeypatch):
  monkeypatch.setenv("BV_DISTRIBUTED", "auto")
  assert distributed.initialize().source == "auto"
  assert fresh == [((None, None, None), {"local_device_ids": None})]


WORKER = textwrap.dedent("""
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P
    from big_vision import distributed

    plan = distributed.initialize()  # From BV_* variables, before any other JAX call.
    pid = jax.process_index()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    # Global array [1, 2, 3, 4]: each process holds the two values of its two devices.
    local = np.arange(1, 3, dtype=np.float32) + 2 * pid
    x = multihost_utils.host_local_array_to_global_array(local, mesh, P("d"))
    total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, P()))(x)
    gathered = multihost_utils.process_allgather(np.array([pid * 10 + 1]))
    print("RESULT " + json.dumps({
        "source": plan.source, "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "process_index": pid, "sum": float(total), "gathered": gathered.tolist()}), flush=True)
    jax.distributed.shutdown()  # Together, as the trainer does: no hang at exit.
""")


def test_two_real_processes_on_localhost():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("BV_", "SLURM_", "OMPI_", "PMI_", "MV2_", "TPU_", "MASTER_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, BV_NUM_PROCESSES="2",
             BV_COORDINATOR_ADDRESS=f"localhost:{processes.free_port()}",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT,
                            env=dict(env, BV_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=120)  # A hang fails the test instead of blocking.
      assert p.returncode == 0, err[-3000:]
      # raw_decode: the runtime may print on the same line after the result at exit.
      results.append(json.JSONDecoder().raw_decode(out.split("RESULT ", 1)[1])[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, r in enumerate(results):
    assert r == {"source": "bv_env", "process_count": 2, "device_count": 4,
                 "local_device_count": 2, "process_index": i, "sum": 10.0,
                 "gathered": [[1], [11]]}
