"""Several Python processes on localhost at once, for the tests of multi-host code paths
(jax.distributed on the CPU): a free port for the coordinator, and a run that fails the
test, with the process's stderr, when one of them fails or hangs."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_all(args_per_process, env=None, timeout=240):
  """Starts `python ARGS` for every ARGS at once in the repository root, with one CPU
  device each (env adds to or overrides that), and returns their stdouts."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})}
  procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for args in args_per_process]
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:  # A hang fails the test instead of leaving processes behind.
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]
