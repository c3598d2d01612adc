"""init_from: parameters of another run load across scan layouts and device counts, and a
checkpoint of another model is refused instead of half-loaded."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from big_vision import checkpointing
from big_vision import train_step
from big_vision.models import ae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed, **model):
  config = dict(dict(variant="Mu/4", image_size=28, channels=1), **model)
  return train_step.make_init_params(ae.build_model(config))(jax.random.PRNGKey(seed))


@pytest.mark.parametrize("source_scan,target_scan", [(False, True), (True, False)])
def test_scanned_and_unrolled_blocks_load_into_each_other(source_scan, target_scan):
  source, fresh = _params(0, scan=source_scan), _params(1, scan=target_scan)
  merged, kept_fresh, unused = checkpointing.merge_params(fresh, source)
  assert kept_fresh == [] and unused == []
  # A block's kernel: the source's, whichever layout holds it.
  stacked, unrolled = (source, merged) if source_scan else (merged, source)
  for i in range(2):
    np.testing.assert_array_equal(
        stacked["encoder"]["blocks"]["mlp"]["fc1"]["kernel"][i],
        unrolled["encoder"][f"block_{i:02d}"]["mlp"]["fc1"]["kernel"])


def test_arrays_of_another_model_are_reported_unused():
  fresh = _params(1)
  source = _params(0, variant="Mu/7")  # Another patch size: other patch and head shapes.
  _, kept_fresh, unused = checkpointing.merge_params(fresh, source)
  assert "['patch_embedding']['kernel']" in kept_fresh
  assert "['patch_embedding']['kernel'] (49, 64)" in unused  # 7x7x1 pixels -> 64.
  # A label embedding is new in the target, not a source array lost.
  _, kept_fresh, unused = checkpointing.merge_params(_params(1, num_classes=10), _params(0))
  assert kept_fresh == ["['y_embedder']['table']['embedding']"] and unused == []


def test_params_of_a_run_sharded_over_4_devices_load_on_one(tmp_path):
  """The saving run's shardings name its 4 devices; this process has one."""
  workdir = str(tmp_path / "20240601")  # A workdir named like a step: still a workdir.
  code = textwrap.dedent(f"""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from big_vision import checkpointing
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    x = jax.device_put(np.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data")))
    state = dict(params=dict(w=x), ema_params=dict(w=x + 1), step=np.int32(3))
    ckpt = checkpointing.Checkpointer({workdir!r})
    ckpt.save(3, state, dict(step=3))
    ckpt.wait()
    ckpt.close()
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for path in (workdir, os.path.join(workdir, "checkpoints", "3")):
    loaded, step = checkpointing.load_params(path)
    assert step == 3 and set(loaded) == {"params", "ema_params"}
    np.testing.assert_array_equal(loaded["params"]["w"], np.arange(32.0).reshape(8, 4))
    np.testing.assert_array_equal(loaded["ema_params"]["w"], np.arange(32.0).reshape(8, 4) + 1)


def test_training_from_another_model_is_refused(data_dir, tmp_path, monkeypatch):
  from big_vision import train
  from big_vision.config_parsing import ConfigError
  from tests.test_train import fmnist_config
  other = _params(0, variant="Mu/7")
  monkeypatch.setattr(checkpointing, "load_params", lambda path: ({"params": other}, 5))
  config = fmnist_config(data_dir, "total_steps=1,init_from=/runs/mu7")
  with pytest.raises(ConfigError, match=r"init_from=/runs/mu7: 3 of its arrays fit nowhere "
                                        r"in this model .*patch_embedding"):
    train.train(config, str(tmp_path / "run"))
