"""run_tpu.sh and ibrun.sh: shellcheck-clean, and their --dry-run commands."""
import os
import shlex
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = ["--config", "configs/ae_i1k.py:variant=B/4,size=64", "--workdir", "/tmp/w x"]


@pytest.mark.parametrize("script", ["run_tpu.sh", "ibrun.sh"])
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (CI installs it with apt-get)")
  out = subprocess.run(["shellcheck", os.path.join(ROOT, script)], capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stdout


def _run(script, args, env_extra=None, path_dir=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "PBS", "TFDS"))}
  env.update(env_extra or {})
  if path_dir:
    env["PATH"] = f"{path_dir}:/usr/bin:/bin"
  return subprocess.run(["bash", os.path.join(ROOT, script)] + args, capture_output=True,
                        text=True, env=env, cwd=ROOT)


def _fake_bin(tmp_path, name, body="exit 0"):
  path = tmp_path / name
  path.write_text(f"#!/bin/bash\n{body}\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_run_tpu_dry_run(tmp_path):
  out = _run("run_tpu.sh", ["--dry-run", "--tpu", "my-pod", "--zone", "us-central2-b",
                            "--tfds-data-dir", "gs://data/tfds", "--"] + TRAINER)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert all(l.startswith("+ ") for l in lines) and len(lines) == 4
  words = [shlex.split(l[2:]) for l in lines]
  assert words[0][0] == "git" and "archive" in words[0] and words[0][-1] == "HEAD"
  assert words[1][:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "scp" in words[1]
  assert "--worker=all" in words[1]
  install = words[2][words[2].index("--command") + 1]
  assert "pip install -q -r requirements.txt 'jax[tpu]'" in install
  launch = words[3]
  assert "--worker=all" in launch and launch[launch.index("--zone") + 1] == "us-central2-b"
  remote = shlex.split(launch[launch.index("--command") + 1])
  assert "TFDS_DATA_DIR=gs://data/tfds" in remote
  # The trainer's arguments arrive verbatim on the workers (commas and spaces kept).
  i = remote.index("big_vision.train")
  assert remote[i + 1:] == TRAINER


def test_run_tpu_usage_errors():
  out = _run("run_tpu.sh", ["--", "--workdir", "x"])
  assert out.returncode == 2 and "missing --tpu NAME --zone ZONE" in out.stderr
  out = _run("run_tpu.sh", ["--tpu", "a", "--zone", "b"])
  assert out.returncode == 2 and "no trainer arguments" in out.stderr


def test_ibrun_dry_run_slurm(tmp_path):
  _fake_bin(tmp_path, "srun")
  _fake_bin(tmp_path, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\ngpu-node-09\\n"')
  out = _run("ibrun.sh", ["--dry-run", "--per-gpu", "--gpus-per-node", "4", "--"] + TRAINER,
             env_extra={"SLURM_JOB_NODELIST": "gpu-node-[07-09]", "SLURM_JOB_ID": "1"},
             path_dir=str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert "+ export BV_COORDINATOR_ADDRESS=gpu-node-07:12355" in out.stdout
  assert "+ export BV_NUM_PROCESSES=12" in out.stdout
  command = shlex.split(out.stdout.splitlines()[-1][2:])
  assert command[:7] == ["srun", "--nodes", "3", "--ntasks", "12", "--ntasks-per-node", "4"]
  assert "CUDA_VISIBLE_DEVICES" in command[command.index("-c") + 1]
  assert "big_vision.train" in command and command[-len(TRAINER):] == TRAINER


def test_ibrun_prefers_ibrun_and_per_node(tmp_path):
  for name in ("ibrun", "srun", "mpirun"):
    _fake_bin(tmp_path, name)
  _fake_bin(tmp_path, "hostname", "echo login1")
  out = _run("ibrun.sh", ["--dry-run", "--port", "4000", "--"] + TRAINER,
             path_dir=str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert "BV_COORDINATOR_ADDRESS=login1:4000" in out.stdout
  assert out.stdout.splitlines()[-1].startswith("+ ibrun -n 1 ")


def test_ibrun_mpirun_with_pbs_nodefile(tmp_path):
  _fake_bin(tmp_path, "mpirun")
  nodefile = tmp_path / "nodes"
  nodefile.write_text("n2\nn1\nn2\nn1\n")
  out = _run("ibrun.sh", ["--dry-run", "--"] + TRAINER, env_extra={"PBS_NODEFILE": str(nodefile)},
             path_dir=str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert "BV_COORDINATOR_ADDRESS=n1:12355" in out.stdout and "BV_NUM_PROCESSES=2" in out.stdout
  assert out.stdout.splitlines()[-1].startswith("+ mpirun -np 2 --map-by ppr:1:node")


def test_ibrun_errors(tmp_path):
  out = _run("ibrun.sh", ["--dry-run", "--"] + TRAINER, path_dir=str(tmp_path))
  assert out.returncode == 2 and "none of ibrun, srun or mpirun" in out.stderr
  out = _run("ibrun.sh", ["--launcher", "qsub", "--"] + TRAINER, path_dir=str(tmp_path))
  assert out.returncode == 2 and "unknown launcher 'qsub'" in out.stderr
