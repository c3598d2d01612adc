"""Scaling out: gradient accumulation equals the full batch; replicated and FSDP training
agree on 8 simulated devices and FSDP really splits the arrays."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.test_train import data_dir, fmnist_config, read_metrics  # pylint: disable=unused-import
from big_vision import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("method", ["maskdit"])
def test_grad_accumulation_equals_full_batch(data_dir, tmp_path, method):
  states = {}
  for accum in (1, 4):
    config = fmnist_config(data_dir, f"method={method},total_steps=3,lr=1e-2",
                           log_training_steps=1, grad_accum_steps=accum)
    states[accum], _ = train.train(config, str(tmp_path / f"accum{accum}"))
  a, b = (read_metrics(str(tmp_path / f"accum{k}")) for k in (1, 4))
  for ra, rb in zip(a, b):
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
  for x, y in zip(jax.tree_util.tree_leaves(states[1]["params"]),
                  jax.tree_util.tree_leaves(states[4]["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_replicated_and_fsdp_agree_on_8_devices(data_dir, tmp_path):
  code = textwrap.dedent(f"""
    import json, jax, numpy as np
    from tests.test_train import fmnist_config, read_metrics
    from big_vision import train
    assert jax.device_count() == 8
    out = {{}}
    for fsdp in (False, True):
      config = fmnist_config({data_dir!r}, f"variant=Mu/4,total_steps=3,fsdp={{fsdp}}",
                             log_training_steps=1)
      workdir = {str(tmp_path)!r} + f"/fsdp{{fsdp}}"
      state, _ = train.train(config, workdir)
      out[str(fsdp)] = [r["loss"] for r in read_metrics(workdir)]
      kernel = state["params"]["encoder"]["block_00"]["mlp"]["fc1"]["kernel"]
      shards = {{s.data.shape for s in kernel.addressable_shards}}
      out[str(fsdp) + "_shards"] = [list(s) for s in shards]
      out[str(fsdp) + "_mu_shards"] = [list(s) for s in {{
          s.data.shape for s in jax.tree_util.tree_leaves(
              state["opt_state"])[1].addressable_shards}}]
    print("RESULT" + json.dumps(out))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", WANDB_MODE="disabled", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  assert proc.returncode == 0 and line, proc.stderr[-3000:]
  import json
  out = json.loads(line[0][len("RESULT"):])
  np.testing.assert_allclose(out["True"], out["False"], rtol=1e-5)
  # Replicated: every device holds the whole (64, 256) kernel; FSDP: 1/8 of it.
  assert out["False_shards"] == [[64, 256]]
  assert out["True_shards"] == [[64, 32]]
