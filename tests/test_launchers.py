"""run_tpu.sh and ibrun.sh: shellcheck-clean, usage errors, and the commands --dry-run
prints under fake clusters (fake srun/ibrun/mpirun/scontrol on PATH, fake SLURM/PBS env)."""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Commas, slashes, spaces, quotes and an empty word must all reach the trainer as they are.
TRAINER = ["--config", "configs/ae_i1k.py:variant=B/4,size=64", "--workdir", "/tmp/w x",
           "--config.note=it's $HOME", ""]
CLUSTER_VARS = ("SLURM", "PBS", "TFDS", "OMPI", "PMI", "MV2", "BV_", "CUDA_VISIBLE", "PYTHON")


def _run(script, args, env_extra=None, path_dir=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS)}
  env.update(env_extra or {})
  if path_dir:  # Only the fakes and the basic tools: no real launcher can leak in.
    env["PATH"] = f"{path_dir}:/usr/bin:/bin"
  return subprocess.run(["bash", os.path.join(ROOT, script)] + args, capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=60)


def _fake_bin(directory, name, body="exit 0"):
  path = directory / name
  path.write_text(f"#!/bin/bash\n{body}\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def _commands(stdout):
  lines = stdout.splitlines()
  assert lines and all(l.startswith("+ ") for l in lines), stdout
  return [shlex.split(l[2:]) for l in lines]


@pytest.mark.parametrize("script", ["run_tpu.sh", "ibrun.sh", "scripts/benchmark_gpu.sh",
                                    "scripts/setup.sh", "scripts/test.sh",
                                    "scripts/train_fmnist.sh", ".ci/run"])
def test_shellcheck_clean(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (CI installs it: apt-get install -y shellcheck)")
  out = subprocess.run(["shellcheck", "--severity=style", os.path.join(ROOT, script)],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script", ["run_tpu.sh", "ibrun.sh"])
def test_help(script):
  for flag in ("-h", "--help"):
    out = _run(script, [flag])
    assert out.returncode == 0 and out.stdout.startswith("Runs a training"), out.stderr
    assert f"Usage: {script} [--dry-run]" in out.stdout and "--" in out.stdout
    assert "set -euo" not in out.stdout and "#" not in out.stdout.splitlines()[0]


# run_tpu.sh


def _tpu_dry_run(extra, env_extra=None):
  out = _run("run_tpu.sh", ["--dry-run", "--tpu", "my-pod", "--zone", "us-central2-b"] + extra
             + ["--"] + TRAINER, env_extra)
  assert out.returncode == 0, out.stderr
  return _commands(out.stdout)


def test_run_tpu_dry_run_commands():
  archive, scp, setup, launch = _tpu_dry_run(
      ["--project", "my-proj", "--tfds-data-dir", "gs://data/tf ds"])
  assert archive[:2] == ["git", "-C"] and archive[2] == ROOT and "archive" in archive
  assert archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tarball
  assert scp[6] == "my-pod:big_vision.tar.gz"
  for command in (scp, setup, launch):
    assert "--worker=all" in command
    assert command[command.index("--zone") + 1] == "us-central2-b"
    assert command[command.index("--project") + 1] == "my-proj"
  for command in (setup, launch):
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
  install = setup[setup.index("--command") + 1]
  assert "tar xzf big_vision.tar.gz -C big_vision" in install
  assert "python3 -m venv .venv" in install
  assert ".venv/bin/pip install -q -r requirements.txt 'jax[tpu]'" in install
  remote = shlex.split(launch[launch.index("--command") + 1])
  assert remote[:3] == ["cd", "big_vision", "&&"]
  assert "BV_DISTRIBUTED=auto" in remote and "TFDS_DATA_DIR=gs://data/tf ds" in remote
  i = remote.index("big_vision.train")
  assert remote[i - 2:i] == [".venv/bin/python", "-m"] and remote[i + 1:] == TRAINER


def test_run_tpu_remote_command_runs_the_trainer_verbatim(tmp_path):
  """The launch command, run by a real shell in a fake worker home, starts the trainer with
  exactly the given arguments and TFDS_DATA_DIR."""
  *_, launch = _tpu_dry_run(["--repo-dir", "my repo"], {"TFDS_DATA_DIR": "/data/tfds"})
  assert "--project" not in launch  # gcloud's configured project.
  venv_bin = tmp_path / "my repo" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  _fake_bin(venv_bin, "python",
            'printf "%s\\n" "$TFDS_DATA_DIR" "$BV_DISTRIBUTED"; printf "[%s]\\n" "$@"')
  out = subprocess.run(["sh", "-c", launch[launch.index("--command") + 1]], cwd=tmp_path,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == (["/data/tfds", "auto", "[-m]", "[big_vision.train]"]
                                     + [f"[{a}]" for a in TRAINER])


def test_run_tpu_usage_errors():
  out = _run("run_tpu.sh", ["--", "--workdir", "x"])
  assert out.returncode == 2 and "missing --tpu NAME --zone ZONE" in out.stderr
  out = _run("run_tpu.sh", ["--tpu", "a", "--", "--workdir", "x"])
  assert out.returncode == 2 and "missing --zone ZONE" in out.stderr
  assert "--tpu NAME" not in out.stderr.splitlines()[0]
  out = _run("run_tpu.sh", ["--tpu", "a", "--zone", "b"])
  assert out.returncode == 2 and "no trainer arguments after --" in out.stderr
  out = _run("run_tpu.sh", ["--tpu", "a", "--zone"])
  assert out.returncode == 2 and "--zone needs a value" in out.stderr
  out = _run("run_tpu.sh", ["--tpu", "a", "--zone", "b", "--workdir", "x"])
  assert out.returncode == 2 and "unknown option '--workdir'" in out.stderr
  assert out.stdout == ""


# ibrun.sh


def test_ibrun_srun_per_gpu_on_slurm(tmp_path):
  _fake_bin(tmp_path, "srun")
  _fake_bin(tmp_path, "mpirun")  # srun comes first.
  _fake_bin(tmp_path, "scontrol",
            '[ "$*" = "show hostnames gpu-node-[07-09]" ] && printf "gpu-node-07\\ngpu-node-08\\ngpu-node-09\\n"')
  out = _run("ibrun.sh", ["--dry-run", "--per-gpu", "--gpus-per-node", "4", "--"] + TRAINER,
             env_extra={"SLURM_JOB_NODELIST": "gpu-node-[07-09]", "SLURM_JOB_ID": "1"},
             path_dir=str(tmp_path))
  assert out.returncode == 0, out.stderr
  *exports, command = _commands(out.stdout)
  assert exports == [["export", "BV_COORDINATOR_ADDRESS=gpu-node-07:12355"],
                     ["export", "BV_NUM_PROCESSES=12"],  # 3 nodes x 4 GPUs.
                     ["export", f"PYTHONPATH={ROOT}"]]
  assert command[:8] == ["srun", "--nodes", "3", "--ntasks", "12", "--ntasks-per-node", "4",
                         "--kill-on-bad-exit=1"]
  assert command[command.index("bash"):command.index("bash") + 2] == ["bash", "-c"]
  assert command[-len(TRAINER) - 3:] == [f"{ROOT}/.venv/bin/python", "-m",
                                         "big_vision.train"] + TRAINER


def _per_gpu_wrapper(env):
  """Runs ibrun.sh's per-GPU wrapper like a launched process would; returns its GPU."""
  out = _run("ibrun.sh", ["--dry-run", "--launcher", "srun", "--per-gpu", "--gpus-per-node",
                          "2", "--", "x"])
  command = _commands(out.stdout)[-1]
  script = command[command.index("-c") + 1]
  return subprocess.run(["bash", "-c", script, "per-gpu", "bash", "-c",
                         'echo "$CUDA_VISIBLE_DEVICES"'], env=dict(env, PATH="/usr/bin:/bin"),
                        capture_output=True, text=True)


def test_ibrun_per_gpu_wrapper_picks_the_local_ranks_gpu():
  assert _per_gpu_wrapper({"SLURM_LOCALID": "1"}).stdout == "1\n"
  # An index into the GPUs the allocation made visible.
  assert _per_gpu_wrapper({"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "4,6"}).stdout == "6\n"
  # MPI's local rank beats the batch step's stale SLURM_LOCALID.
  env = {"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "2,3"}
  assert _per_gpu_wrapper(env).stdout == "3\n"
  out = _per_gpu_wrapper({"MV2_COMM_WORLD_LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
  assert out.returncode != 0 and "local rank 2 but only CUDA_VISIBLE_DEVICES=0,1" in out.stderr


def test_ibrun_processes_get_consistent_distributed_plans(tmp_path):
  """ibrun.sh + a fake srun that starts the tasks as SLURM would + distributed.plan():
  every process agrees on the coordinator and count, and ids are 0..N-1."""
  _fake_bin(tmp_path, "scontrol", 'printf "c1\\nc2\\nc3\\n"')
  _fake_bin(tmp_path, "srun", """
while [ "$1" != --export=ALL ]; do case $1 in --ntasks) n=$2;; --ntasks-per-node) t=$2;; esac; shift; done; shift
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % t)) SLURM_STEP_NUM_TASKS=$n "$@" || exit 1
done""")
  python = _fake_bin(tmp_path, "python", (
      f'exec {sys.executable} -c "import os, sys; '
      'sys.modules[\'jax\'] = type(sys)(\'jax\'); from big_vision import distributed; '
      'p = distributed.plan(os.environ); '
      'print(p.coordinator_address, p.num_processes, p.process_id, '
      'os.environ[\'CUDA_VISIBLE_DEVICES\'], sys.argv[1:])" "$@"'))
  out = _run("ibrun.sh", ["--nodes", "2", "--per-gpu", "--gpus-per-node", "2", "--port", "4000",
                          "--"] + TRAINER,
             env_extra={"SLURM_JOB_NODELIST": "c[1-3]", "SLURM_JOB_ID": "9", "PYTHON": python},
             path_dir=str(tmp_path))
  assert out.returncode == 0, out.stderr
  argv = str(["-m", "big_vision.train"] + TRAINER)
  assert out.stdout.splitlines() == [f"c1:4000 4 {i} {i % 2} {argv}" for i in range(4)]


def test_ibrun_prefers_ibrun_one_process_per_node(tmp_path):
  for name in ("mpirun", "srun", "ibrun"):
    _fake_bin(tmp_path, name)
  _fake_bin(tmp_path, "hostname", "echo login1")
  out = _run("ibrun.sh", ["--dry-run", "--port", "4000", "--"] + TRAINER,
             path_dir=str(tmp_path))
  assert out.returncode == 0, out.stderr
  *exports, command = _commands(out.stdout)
  assert ["export", "BV_COORDINATOR_ADDRESS=login1:4000"] in exports
  assert ["export", "BV_NUM_PROCESSES=1"] in exports
  assert command[:3] == ["ibrun", "-n", "1"] and command[-len(TRAINER):] == TRAINER
  assert "CUDA_VISIBLE_DEVICES" not in out.stdout  # Per node: every process sees all GPUs.
  # --launcher overrides the choice.
  out = _run("ibrun.sh", ["--dry-run", "--launcher", "srun", "--"] + TRAINER,
             path_dir=str(tmp_path))
  assert _commands(out.stdout)[-1][0] == "srun"


def test_ibrun_mpirun_with_pbs_nodefile(tmp_path):
  _fake_bin(tmp_path, "mpirun")
  nodefile = tmp_path / "nodes"
  nodefile.write_text("n2\nn2\nn1\nn1\nn3\nn3\n")  # One line per slot; n2 is process 0's.
  out = _run("ibrun.sh", ["--dry-run", "--per-gpu", "--gpus-per-node", "2", "--"] + TRAINER,
             env_extra={"PBS_NODEFILE": str(nodefile), "TFDS_DATA_DIR": "/d"},
             path_dir=str(tmp_path))
  assert out.returncode == 0, out.stderr
  *exports, command = _commands(out.stdout)
  assert ["export", "BV_COORDINATOR_ADDRESS=n2:12355"] in exports
  assert ["export", "BV_NUM_PROCESSES=6"] in exports
  assert command[:5] == ["mpirun", "-np", "6", "--map-by", "ppr:2:node"]
  forwarded = {command[i + 1] for i, w in enumerate(command) if w == "-x"}
  assert {"BV_COORDINATOR_ADDRESS", "BV_NUM_PROCESSES", "PYTHONPATH", "PATH",
          "TFDS_DATA_DIR"} <= forwarded
  assert command[-len(TRAINER):] == TRAINER


def test_ibrun_hostfile_and_node_subset(tmp_path):
  _fake_bin(tmp_path, "mpirun")
  hostfile = tmp_path / "hosts"
  hostfile.write_text("# our nodes\nh7 slots=4\nh8 slots=4\nh9\n")
  out = _run("ibrun.sh", ["--dry-run", "--hostfile", str(hostfile), "--nodes", "2", "--"]
             + TRAINER, path_dir=str(tmp_path))
  assert out.returncode == 0, out.stderr
  *exports, command = _commands(out.stdout)
  assert ["export", "BV_COORDINATOR_ADDRESS=h7:12355"] in exports
  assert ["export", "BV_NUM_PROCESSES=2"] in exports
  assert command[:3] == ["mpirun", "-np", "2"]
  assert command[command.index("--hostfile") + 1] == str(hostfile)


def test_ibrun_slurm_without_scontrol_uses_this_host(tmp_path):
  _fake_bin(tmp_path, "srun")
  _fake_bin(tmp_path, "hostname", "echo node-a")
  out = _run("ibrun.sh", ["--dry-run", "--"] + TRAINER, path_dir=str(tmp_path),
             env_extra={"SLURM_JOB_NODELIST": "node-[a,b]", "SLURM_JOB_NUM_NODES": "2"})
  assert out.returncode == 0, out.stderr
  assert "+ export BV_COORDINATOR_ADDRESS=node-a:12355" in out.stdout
  assert "+ export BV_NUM_PROCESSES=2" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--launcher", "qsub"], "unknown launcher 'qsub'; use ibrun, srun or mpirun"),
    (["--launcher", "srun", "--nodes", "two"], "--nodes 'two' is not a positive integer"),
    (["--launcher", "srun", "--nodes", "0"], "--nodes '0' is not a positive integer"),
    (["--launcher", "srun", "--nodes", "3"], "--nodes 3 but this host has 1 host(s)"),
    (["--launcher", "srun", "--port", "70000"], "--port '70000' is above 65535"),
    (["--launcher", "srun", "--gpus-per-node", "-1"], "--gpus-per-node '-1' is not a positive"),
    (["--launcher", "srun", "--per-gpu"], "--per-gpu needs --gpus-per-node"),
    (["--launcher", "srun", "--hostfile", "/nonexistent"], "--hostfile '/nonexistent' cannot"),
    (["--launcher", "srun", "--port"], "--port needs a value"),
    (["--launcher", "srun", "--workdir", "x"], "unknown option '--workdir'"),
    ([], "none of ibrun, srun or mpirun is on PATH; pass --launcher"),
])
def test_ibrun_usage_errors(tmp_path, args, message):
  _fake_bin(tmp_path, "hostname", "echo login1")
  out = _run("ibrun.sh", args + ["--"] + TRAINER, path_dir=str(tmp_path))
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert out.stdout == ""
  out = _run("ibrun.sh", ["--launcher", "srun"], path_dir=str(tmp_path))
  assert out.returncode == 2 and "no trainer arguments after --" in out.stderr


def test_benchmark_gpu_script_names_an_unknown_variant(tmp_path):
  out = subprocess.run(["bash", os.path.join(ROOT, "scripts/benchmark_gpu.sh"),
                        str(tmp_path / "out"), "flash"], capture_output=True, text=True)
  assert out.returncode == 2
  assert "unknown variant flash; known: xla cudnn cudnn_bf16" in out.stderr


def test_benchmark_gpu_table_lists_failed_variants_and_unknown_peaks(tmp_path):
  """A variant that failed before its step was timed (its JSON has only the error) and a
  GPU without a known peak (fraction None) still give the table."""
  (tmp_path / "b1024.json").write_text(json.dumps(dict(device="H100", error="OOM: 84 GiB")))
  (tmp_path / "x.json").write_text(json.dumps(dict(device="X", train=dict(
      images_per_s=10, step_s=0.1, fraction_of_peak_analytic=None, fraction_of_peak=None,
      peak_memory_bytes=2**30))))
  out = subprocess.run(["bash", os.path.join(ROOT, "scripts/benchmark_gpu.sh"),
                        str(tmp_path), "table"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHON=sys.executable))
  assert out.returncode == 0, out.stderr
  assert "b1024 | H100 | failed: OOM: 84 GiB" in out.stdout
  assert "x | X | 10 | 100.0 | - | - | 1.0 | - | - | -" in out.stdout


# scripts/train_fmnist.sh


def _train_fmnist(tmp_path, args, feature_net):
  """Runs the script in a copy of the repository layout with a no-op setup.sh and a fake
  .venv/bin/python that prints its arguments, one a line."""
  (tmp_path / "scripts").mkdir()
  shutil.copy(os.path.join(ROOT, "scripts", "train_fmnist.sh"), tmp_path / "scripts")
  _fake_bin(tmp_path / "scripts", "setup.sh")
  (tmp_path / ".venv" / "bin").mkdir(parents=True)
  _fake_bin(tmp_path / ".venv" / "bin", "python", 'printf "%s\\n" "$@"')
  feature_net.write_text("weights")
  env = {k: v for k, v in os.environ.items() if k not in ("WORKDIR", "FEATURE_NET")}
  env["FEATURE_NET"] = str(feature_net)
  out = subprocess.run(["bash", str(tmp_path / "scripts" / "train_fmnist.sh")] + args,
                       capture_output=True, text=True, env=env, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


@pytest.mark.parametrize("args,expected", [
    ([], ["--config", "configs/ae_fmnist.py:feature_net='{}'"]),
    # Only overrides: the default config, which they override.
    (["--config.ckpt_steps=100"],
     ["--config", "configs/ae_fmnist.py:feature_net='{}'", "--config.ckpt_steps=100"]),
    (["--config", "configs/ae_fmnist.py:method=mae", "--x"],
     ["--config", "configs/ae_fmnist.py:method=mae,feature_net='{}'", "--x"]),
    (["--config=configs/ae_fmnist.py", "--config.seed=1"],
     ["--config=configs/ae_fmnist.py:feature_net='{}'", "--config.seed=1"]),
    # The user's own feature_net=, and other configs, stay as they are.
    (["--config", "configs/ae_fmnist.py:feature_net=/mine.npz"],
     ["--config", "configs/ae_fmnist.py:feature_net=/mine.npz"]),
    (["--config", "configs/ae_i1k.py:variant=B/4"], ["--config", "configs/ae_i1k.py:variant=B/4"]),
])
def test_train_fmnist_passes_the_feature_net_to_the_config(tmp_path, args, expected):
  # Was: the classifier was trained at FEATURE_NET, and the evals looked at the default.
  feature_net = tmp_path / "my nets" / "fmnist.npz"
  feature_net.parent.mkdir()
  lines = _train_fmnist(tmp_path, args, feature_net)
  assert lines[:3] == ["-m", "big_vision.train", "--workdir"]
  assert lines[4:] == [e.format(feature_net) for e in expected]


def test_train_fmnist_config_string_reaches_the_feature_net(tmp_path):
  from configs import ae_fmnist
  feature_net = tmp_path / "a,b" / "fmnist.npz"  # A comma, as the config string splits.
  feature_net.parent.mkdir()
  spec = _train_fmnist(tmp_path, [], feature_net)[5]
  config = ae_fmnist.get_config(spec.partition(":")[2])
  assert config.evals.samples.feature_net.weights == str(feature_net)
  assert config.evals.inpainting.feature_net.weights == str(feature_net)


# scripts/benchmark_gpu.sh and the README's commands


@pytest.mark.parametrize("venv", [True, False])
def test_benchmark_gpu_python_defaults_to_the_venv(tmp_path, venv):
  # A bare GPU machine has no .venv: python3 there, the project's .venv where it exists.
  (tmp_path / "scripts").mkdir()
  shutil.copy(os.path.join(ROOT, "scripts", "benchmark_gpu.sh"), tmp_path / "scripts")
  record = f'echo "$0" >> {tmp_path}/ran'
  fakes = tmp_path / "bin"
  fakes.mkdir()
  _fake_bin(fakes, "python3", record)
  if venv:
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    _fake_bin(tmp_path / ".venv" / "bin", "python", record)
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS)}
  env["PATH"] = f"{fakes}:/usr/bin:/bin"
  out = subprocess.run(["bash", str(tmp_path / "scripts" / "benchmark_gpu.sh"),
                        str(tmp_path / "out"), "xla"], capture_output=True, text=True,
                       env=env, timeout=60)
  assert out.returncode == 0, out.stderr
  ran = (tmp_path / "ran").read_text().split()
  assert ran == [".venv/bin/python" if venv else str(fakes / "python3")] * 2  # Bench, table.


def test_readme_slurm_example_is_ibrun_headers():
  readme = open(os.path.join(ROOT, "README.md")).read()
  header = open(os.path.join(ROOT, "ibrun.sh")).read().split("set -euo")[0]
  salloc = [l.strip() for l in readme.splitlines() if l.strip().startswith("salloc")]
  assert salloc and all(f"#   {l}\n" in header for l in salloc), salloc
