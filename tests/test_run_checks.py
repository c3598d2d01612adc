"""Run checks: launch with one process, ETA past a day, run lengths that train nothing,
checkpoints of a bucket workdir."""
import pytest

from big_vision import distributed
from big_vision import metric_writer
from big_vision import train
from big_vision import config_cli
from big_vision.config_parsing import ConfigError


def test_ibrun_single_process_plan():
  # `bash ibrun.sh -- ...` on one node exports these two; the launcher's size is 1.
  env = {"BV_COORDINATOR_ADDRESS": "n1:12355", "BV_NUM_PROCESSES": "1"}
  for extra in ({}, {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},
                {"PMI_SIZE": "1", "PMI_RANK": "0"}):
    p = distributed.plan(dict(env, **extra))
    assert (p.coordinator_address, p.num_processes, p.process_id) == ("n1:12355", 1, 0)


def test_env_process_id_out_of_range_is_one_clear_error():
  env = {"BV_COORDINATOR_ADDRESS": "n1:12355", "BV_NUM_PROCESSES": "8", "BV_PROCESS_ID": "8"}
  with pytest.raises(ValueError, match=r"process_id=8 is not in \[0, num_processes=8\)"):
    distributed.plan(env)


def test_eta_beyond_one_day():
  progress = metric_writer.Progress(total_steps=1_000_000, batch_size=1024, first_step=0)
  # 1e6 steps of 1024 images at 2048 img/s: 500000 s = 5 days 18:53:20.
  line = progress.line(0, {"loss": 1.0, "lr": 1e-4}, rate=2048.0)
  assert "ETA 5d 18:53:20" in line, line
  short = metric_writer.Progress(total_steps=100, batch_size=10, first_step=0)
  assert "ETA 00:01:40" in short.line(0, {"loss": 1.0, "lr": 1e-4}, rate=10.0)


def test_first_step_after_resumed_evals_has_no_rate(monkeypatch):
  """Resumed runs run the evals due at the checkpoint's step before their first step,
  which compiles: its line says so rather than a rate and ETA that count compilation."""
  clock = iter([100.0, 102.0, 103.0, 107.0])
  monkeypatch.setattr(metric_writer.time, "time", lambda: next(clock))
  progress = metric_writer.Progress(total_steps=1000, batch_size=128, first_step=500)
  progress.restart(500)  # Evals at the checkpoint's step (no clock read now).
  assert progress.measure(501) is None  # t=100: compiled.
  assert progress.measure(502) == pytest.approx(64.0)  # t=102: one step in 2 s.
  progress.restart(502)  # t=103, after pictures or evals ...
  assert progress.measure(504) == pytest.approx(64.0)  # t=107: ... which do not count.


@pytest.mark.parametrize("arg,message", [
    ("total_steps=-5", "total_steps=-5"),
    ("epochs=-1.0", "epochs=-1.0"),
    ("total_steps=10,warmup=1.5", "warmup"),
    ("total_steps=10,warmup=-0.1", "warmup"),
])
def test_run_length_that_trains_nothing_is_a_config_error(arg, message):
  config, _ = config_cli.load_from_argv([f"--config=configs/ae_fmnist.py:{arg}"])
  with pytest.raises(ConfigError, match=message):
    train.check_trainable(config)


@pytest.mark.parametrize("arg,message", [
    ("lr=-0.001", r"lr=-0.001 must be a finite number in \(0, inf\)"),
    ("lr=nan", r"lr=nan must be a finite number"),
    ("wd=-0.1", r"wd=-0.1 must be a finite number in \[0, inf\)"),
    ("beta2=1.0", r"optax.b2=1.0 must be a finite number in \[0, 1\)"),
    ("grad_clip=-1.0", r"grad_clip_norm=-1.0 must be"),  # Would flip the gradient.
    ("ema=1.0", r"ema_decay=1.0 must be a finite number in \[0, 1\)"),  # EMA stays at init.
    ("ema=-0.5", r"ema_decay=-0.5"),
    ("label_dropout=1.5", r"label_dropout=1.5 must be a finite number in \[0, 1\]"),
])
def test_optimizer_values_out_of_range_are_config_errors(arg, message):
  config, _ = config_cli.load_from_argv([f"--config=configs/ae_fmnist.py:{arg}"])
  with pytest.raises(ConfigError, match=message):
    train.check_trainable(config)


def test_optimizer_values_at_their_bounds_are_fine():
  config, _ = config_cli.load_from_argv(["--config=configs/ae_fmnist.py:wd=0.0,beta2=0.0,"
                                         "grad_clip=0.0,ema=0.0,label_dropout=1.0"])
  train.check_trainable(config)


def test_zero_interval_is_a_config_error_not_a_zero_division_mid_run():
  config, _ = config_cli.load_from_argv(
      ["--config=configs/ae_fmnist.py:total_steps=10", "--config.ckpt_steps=0"])
  with pytest.raises(ConfigError, match="ckpt_steps=0 must be an int >= 1"):
    train.check_trainable(config)


def test_checkpoints_of_a_bucket_workdir_stay_in_the_bucket(monkeypatch, tmp_path):
  from big_vision import checkpointing  # pylint: disable=g-import-not-at-top
  seen = []

  class FakeManager:
    def __init__(self, directory, options=None):
      del options
      seen.append(str(directory))

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", FakeManager)
  checkpointing.Checkpointer("gs://bucket/umd_b4")
  checkpointing.Checkpointer("rel/run")
  assert seen == ["gs://bucket/umd_b4/checkpoints", str(tmp_path / "rel/run/checkpoints")]


def test_a_mask_ratio_that_masks_nothing_on_this_grid_is_a_config_error():
  # One 28x28 patch: 0.75 of one token masks none (the clean loss would be exactly 0).
  config, _ = config_cli.load_from_argv(["--config=configs/ae_fmnist.py:variant=Mu/28"])
  with pytest.raises(ConfigError, match=r"mask_ratio_no_noise=0.75 masks none of the 1 tokens"):
    train.check_trainable(config)
  # DiT masks nothing on purpose (mask_ratio 0), and never uses the clean ratio.
  config, _ = config_cli.load_from_argv(["--config=configs/ae_fmnist.py:variant=Mu/28,method=dit"])
  train.check_trainable(config)


def test_a_dataset_with_more_classes_than_the_model_is_a_config_error(data_dir, tmp_path):
  from tests.test_train import fmnist_config
  config = fmnist_config(data_dir, "total_steps=1,use_labels=True")
  assert config.model.num_classes == 10  # Fashion-MNIST's ten: fine.
  train._check_classes(config)
  config.model.num_classes = 9  # Label 9 would be the null class.
  with pytest.raises(ConfigError, match=r"dataset 'fashion_mnist_local' has 10 classes but "
                                        r"model.num_classes=9; set it to 10"):
    train.train(config, str(tmp_path / "run"))
