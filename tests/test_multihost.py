"""Two processes on localhost (2 simulated devices each) train exactly like one process with
4 devices, through JAX's distributed runtime; the checkpoint then resumes in one process."""
import json
import os
import subprocess
import sys

import numpy as np

from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(workdir, steps):
  # One global batch is the whole split and the pp has no randomness, so every layout of
  # processes sees the same examples in the same order.
  return ["-m", "big_vision.train", "--workdir", workdir,
          "--config", f"configs/ae_fmnist.py:variant=Mu/4,batch_size=16,total_steps={steps},"
          "wandb_mode=disabled,evals=False",
          "--config.input.data.split=train[:16]", "--config.input.shuffle_buffer_size=0",
          "--config.input.pp=value_range(-1, 1)|keep('image', 'label')",
          "--config.log_training_steps=1"]


def _env(data_dir, devices):
  # LLVM's -O0 halves XLA:CPU's compile time (most of a run here); every layout compiles
  # with it, so their losses are still compared like for like.
  return dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled", TFDS_DATA_DIR=data_dir,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
              "--xla_backend_optimization_level=0", PYTHONPATH=ROOT)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_two_processes_equal_one_and_restore_elsewhere(data_dir, tmp_path):
  # The one-process reference runs alongside the two processes (separate workdirs): their
  # waits on each other and on their input threads overlap its work.
  single = str(tmp_path / "single")
  reference = subprocess.Popen([sys.executable] + _args(single, 3), cwd=ROOT,
                               env=_env(data_dir, 4), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

  multi = str(tmp_path / "multi")
  port = processes.free_port()
  procs = [subprocess.Popen(
      [sys.executable] + _args(multi, 3) + [
          f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(data_dir, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs + [reference]]
  for p, (_, err) in zip(procs + [reference], outputs):
    assert p.returncode == 0, err[-3000:]
  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([b[k] for k in (1, 2, 3)], [a[k] for k in (1, 2, 3)], rtol=1e-5)
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3"]

  # The 2-process checkpoint resumes in one process with one device and goes on.
  out = subprocess.run([sys.executable] + _args(multi, 4), cwd=ROOT,
                       env=_env(data_dir, 1), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 3" in out.stdout
  assert sorted(_losses(multi)) == [1, 2, 3, 4]
