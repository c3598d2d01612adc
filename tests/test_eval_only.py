"""eval_only checks --config against the run's saved config.json, or uses that one."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from big_vision import checkpointing
from big_vision import config_cli
from big_vision import train
from big_vision.config_parsing import ConfigError
from big_vision.models import ae
from big_vision.tools import eval_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = "variant=Mu/4,batch_size=32,total_steps=2,wandb_mode=disabled"


def make_config(data_dir, options="", **evals):
  config, _ = config_cli.load_from_argv(
      [f"--config=configs/ae_fmnist.py:{OPTIONS}{',' + options if options else ''}"])
  config.input.data.data_dir = data_dir
  config.input.shuffle_buffer_size = 500
  config.evals = ml_collections.ConfigDict(
      evals or dict(val=dict(type="diffusion_loss", split="test[:32]", num_ranges=1)))
  return config


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory):
  """A tiny UMD run's workdir at step 2: config.json as the trainer saves it, and a
  checkpoint of freshly initialised parameters (no training: only the files matter)."""
  path = str(tmp_path_factory.mktemp("umd_run"))
  config = make_config(data_dir)
  train.save_config(config, path)
  model = ae.build_model(config.model)
  params = model.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
                      jnp.zeros((2, 28, 28, 1)), jnp.zeros(2, jnp.int32))["params"]
  ckpt = checkpointing.Checkpointer(path)
  ckpt.save(2, dict(params=params), dict(note="test"))
  ckpt.wait()
  ckpt.close()
  return path


@pytest.mark.parametrize("method,expected", [
    ("dit", "no_noise_prob: run 0.5, config 0.0"),  # Same parameter tree as UMD.
    ("mae", "model.adaln: run True, config False"),  # Would fail deep inside flax.
])
def test_mismatched_config_is_one_clear_line(data_dir, workdir, method, expected):
  with pytest.raises(ConfigError) as e:
    eval_only.evaluate(make_config(data_dir, f"method={method}"), workdir)
  message = str(e.value)
  assert expected in message and "\n" not in message, message
  assert "mask_ratio: run 0.375" in message  # Every differing field is named.
  assert "e.g. --config FILE.py:method=umd,variant=Mu/4" in message
  assert "evals" not in message


def test_matching_config_with_other_evals_proceeds(data_dir, workdir):
  config = make_config(data_dir, "sampling_timesteps=7", val2=dict(
      type="diffusion_loss", split="test[:64]", num_ranges=1))  # Other evals, other sampler.
  config.model.remat_policy = "nothing_saveable"  # The same function, computed otherwise.
  result = eval_only.evaluate(config, workdir)
  assert "val2/loss" in result and "val/loss" not in result
  # From a step's folder, the run's config.json is found two levels up.
  step = os.path.join(workdir, "checkpoints", "2")
  assert eval_only.run_config_path(workdir, step) == os.path.join(workdir, "config.json")
  # Without a config: the run's own, with the evals it trained with.
  saved = eval_only.evaluate(None, workdir, step)
  assert "val/loss" in saved and saved["val/loss"] > 0


@pytest.mark.parametrize("config_args,expected", [
    ([f"--config=configs/ae_fmnist.py:{OPTIONS},method=dit"],
     "no_noise_prob: run 0.5, config 0.0"),
    # No --config: the run's own, but this override.
    (["--config.no_noise_prob=0.0"], "no_noise_prob: run 0.5, config 0.0"),
    # Refused as a mismatch, before Ti/4's heads (3) reject Mu/4's decoder width (64).
    (["--config.model.variant=Ti/4"], "model.variant: run 'Mu/4', config 'Ti/4'"),
])
def test_cli_mismatch_exits_with_one_line(workdir, config_args, expected):
  env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled", BV_JEMALLOC="0")
  out = subprocess.run(
      [sys.executable, "-m", "big_vision.tools.eval_only", *config_args,
       "--workdir", workdir],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if "config error" in l]
  assert len(lines) == 1 and expected in lines[0], out.stderr
  assert "Traceback" not in out.stderr


def test_every_eval_skipped_says_so(data_dir, workdir):
  config = make_config(data_dir, s=dict(type="sampling", num_grid=0, feature_net=dict(
      kind="inception", weights="/nonexistent/inception.npz")))  # Nothing left without FID.
  with pytest.raises(SystemExit, match=r"every eval was skipped \(see above\)"):
    eval_only.evaluate(config, workdir)


def test_the_noised_branch_loss_is_part_of_the_run():
  """A MaskDM run (no x0 loss on masked pixels) is not MaskDiT's, whatever the ratios; a
  config.json from before noised_x0_loss existed is a run with it."""
  from configs import ae_fmnist  # pylint: disable=g-import-not-at-top
  maskdm = ae_fmnist.get_config("method=maskdm")
  with pytest.raises(ConfigError, match=r"noised_x0_loss: run False, config True"):
    eval_only.check_matches_run(ae_fmnist.get_config("method=maskdit,mask_ratio=0.75"),
                                maskdm, "/w/config.json")
  older = ae_fmnist.get_config("")
  del older["noised_x0_loss"]
  eval_only.check_matches_run(ae_fmnist.get_config(""), older, "/w/config.json")
