"""End-to-end training on real Fashion-MNIST with tiny models: loss falls, resume is exact,
bad configs fail fast, every method preset trains, and the ImageNet config runs on mock data."""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from jax.experimental.compilation_cache import compilation_cache

from big_vision import checkpointing
from big_vision import config_cli
from big_vision import input_pipeline
from big_vision import train
from big_vision import train_step
from big_vision.config_parsing import ConfigError
from tests import test_input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fmnist_config(data_dir, arg, overrides_with_evals=(), **overrides):
  config, _ = config_cli.load_from_argv(
      [f"--config=configs/ae_fmnist.py:variant=Mu/4,batch_size=32,wandb_mode=disabled,{arg}"]
      + [f"--config.{k}={v}" for k, v in overrides.items()])
  config.input.data.data_dir = data_dir
  config.input.shuffle_buffer_size = 2000
  if "evals" not in overrides_with_evals:
    config.evals = ml_collections.ConfigDict()  # Evaluators have their own tests.
  train.check_trainable(config)
  return config


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
  """Each train() call jits its functions anew, so a second run of the same config (a
  resume, a restart) compiled the same programs again: most of these tests' time. A
  persistent compilation cache of this module's own hands it the same executables."""
  old = jax.config.jax_compilation_cache_dir
  compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
  compilation_cache.reset_cache()  # Other modules may have run with the cache unset.
  yield
  jax.config.update("jax_compilation_cache_dir", old)
  compilation_cache.reset_cache()


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
  """A 30-step UMD run's workdir; test_init_from_... loads it as its source."""
  config = fmnist_config(data_dir, "total_steps=30,lr=2e-2,warmup=0.1", log_training_steps=1,
                         image_steps=20)
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  train.train(config, workdir)
  return workdir


def test_loss_falls_and_workdir_is_complete(trained_run):
  workdir = trained_run
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, 31))
  losses = np.array([r["loss"] for r in records])
  assert np.isfinite(losses).all()
  assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses
  assert {"loss", "loss_clean", "loss_noised", "lr", "grad_norm"} <= set(records[-1])
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))
  images = sorted(os.listdir(os.path.join(workdir, "images")))
  assert images == ["reconstruction_0000020.png", "reconstruction_0000030.png"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["30"]


class Interrupt(Exception):
  pass


def test_resume_continues_exactly(data_dir, tmp_path, monkeypatch):
  config = fmnist_config(data_dir, "total_steps=12,ema=0.9", log_training_steps=1,
                         ckpt_steps=6)
  straight = str(tmp_path / "straight")
  state_a, _ = train.train(config, straight)

  # Same run, interrupted after step 8 (its last checkpoint is step 6), then restarted.
  resumed = str(tmp_path / "resumed")
  real_start = input_pipeline.start_global

  def start_then_die(*args, **kwargs):
    batches = real_start(*args, **kwargs)
    for _ in range(8):
      yield next(batches)
    raise Interrupt()

  monkeypatch.setattr(input_pipeline, "start_global", start_then_die)
  os.makedirs(resumed)  # An earlier try that died before its first checkpoint logged step 3.
  with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
  with pytest.raises(Interrupt):
    train.train(config, resumed)
  monkeypatch.setattr(input_pipeline, "start_global", real_start)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["6"]
  assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 9))
  ckpt = checkpointing.Checkpointer(resumed)
  assert ckpt.extra(6) == dict(step=6, examples_seen=6 * 32, process_count=1,
                              diffusion=dict(schedule=config.diffusion.schedule,
                                             timesteps=config.diffusion.timesteps))
  ckpt.close()

  # Another batch size would skip 6 batches of another size: the wrong data position.
  other = fmnist_config(data_dir, "total_steps=12,ema=0.9,batch_size=16", ckpt_steps=6)
  with pytest.raises(ConfigError, match=r"batch_size=16.*step 6.*batch_size=32"):
    train.train(other, resumed)
  # Another diffusion has the same state's shapes, but the model learnt other noise levels.
  other = fmnist_config(data_dir, "total_steps=12,ema=0.9,timesteps=200", ckpt_steps=6)
  with pytest.raises(ConfigError, match=r"diffusion \{'schedule': 'cosine', 'timesteps': 200\}"
                                        r", but the checkpoint of step 6 .* trained with "
                                        r"\{'schedule': 'cosine', 'timesteps': 1000\}"):
    train.train(other, resumed)
  # Another model cannot continue this state.
  other = fmnist_config(data_dir, "total_steps=12,ema=0.9,adaln=False", ckpt_steps=6)
  with pytest.raises(ConfigError, match=r"cannot resume: the checkpoint of step 6 in .* "
                                        r"holds another train state \(config.json's .*"
                                        r"model.adaln=True -> False\): "
                                        r".*adaln_modulation.* saved, None now; "):
    train.train(other, resumed)
  with open(os.path.join(resumed, "config.json")) as f:  # The run's own config stays.
    saved = json.load(f)
    assert saved["input"]["batch_size"] == 32 and saved["model"]["adaln"]

  state_b, _ = train.train(config, resumed)
  # Steps 7 and 8 of the interrupted run were discarded with it: each step logged once.
  assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 13))
  # A resume that trains nothing more keeps the config.json of the steps it trained.
  train.train(fmnist_config(data_dir, "total_steps=12,ema=0.9,seed=5", ckpt_steps=6), resumed)
  with open(os.path.join(resumed, "config.json")) as f:
    assert json.load(f)["seed"] == config.seed != 5

  a = {r["step"]: r["loss"] for r in read_metrics(straight)}
  b = {r["step"]: r["loss"] for r in read_metrics(resumed) if r["step"] > 6}
  assert sorted(b) == list(range(7, 13))
  for step in b:
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
  for key in ("params", "ema_params"):
    for x, y in zip(jax.tree_util.tree_leaves(state_a[key]),
                    jax.tree_util.tree_leaves(state_b[key])):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  # The final pictures show the same images, and the same reconstructions (to a level of
  # 8-bit rounding), as the run that was not interrupted.
  png = lambda run: np.asarray(Image.open(os.path.join(run, "images",
                                                       "reconstruction_0000012.png")), float)
  gap = np.abs(png(straight) - png(resumed))
  assert gap.max() <= 1 and gap.mean() < 1e-3, (gap.max(), gap.mean())


def test_resume_with_a_changed_config_is_said_and_kept(tmp_path):
  """The changes are named; config.json becomes the resumed run's, and the one that
  trained the steps before it is kept as config_until_step_N.json."""
  workdir = str(tmp_path)
  config = fmnist_config("/data", "total_steps=12")
  train.save_config(config, workdir)
  assert not train._config_changes(config, workdir)
  changed = fmnist_config("/data", "total_steps=12,seed=3")
  del changed.model["masking"]  # Options a config.json lacks (an older run's) or adds...
  changed.model.new_option = 1
  changes = train._config_changes(changed, workdir)
  assert changes == ["seed=0 -> 3"]
  lines = []
  train._save_resumed_config(changed, workdir, 6, changes, lines.append)
  read = lambda name: json.load(open(os.path.join(workdir, name)))
  assert read("config_until_step_6.json")["seed"] == 0 and read("config.json")["seed"] == 3
  assert lines == ["config.json: this run's config; the one that trained steps up to 6 is "
                   "now config_until_step_6.json"]


def test_records_are_means_over_the_steps_since_the_last():
  steps = [dict(loss=np.float32(x), grad_norm=np.float32(2 * x), lr=np.float32(x / 10))
           for x in (1.0, 2.0, 6.0)]
  assert train._interval_means(steps) == dict(loss=3.0, grad_norm=6.0,
                                              lr=pytest.approx(0.6))
  assert train._interval_means(steps[:1]) == dict(loss=1.0, grad_norm=2.0,
                                                  lr=pytest.approx(0.1))


def test_checkpoint_differences_name_what_the_state_lacks_or_adds(tmp_path):
  w = np.zeros((2, 3), np.float32)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(1, dict(params=dict(w=w), ema_params=dict(w=w)), dict(step=1))
  ckpt.wait()
  assert ckpt.differences(1, dict(params=dict(w=w), ema_params=dict(w=w))) == []
  assert ckpt.differences(1, dict(params=dict(w=w))) == ["ema_params/w: (2, 3) saved, None now"]
  assert ckpt.differences(1, dict(params=dict(w=w[:1]), ema_params=dict(w=w))) == [
      "params/w: (2, 3) saved, (1, 3) now"]
  ckpt.close()


def test_a_run_stopped_in_its_evals_runs_them_when_started_again(data_dir, tmp_path):
  """Stopped in the evals of a checkpoint's step (an intermediate one, then the last), a
  run started again runs the evals that have no results at that step, and only those."""
  config = fmnist_config(data_dir, "total_steps=2", overrides_with_evals=("evals",),
                         ckpt_steps=1)
  config.evals = ml_collections.ConfigDict(dict(
      val=dict(type="diffusion_loss", split="test[:32]", batch_size=32, every_steps=1),
      val2=dict(type="diffusion_loss", split="test[32:64]", batch_size=32, every_steps=1)))
  workdir = str(tmp_path / "run")
  train.train(config, workdir)
  first = read_metrics(workdir)
  val2_at = lambda step: [r for r in first if r["step"] == step and "val2/loss" in r]
  assert len(val2_at(1)) == len(val2_at(2)) == 1

  def assert_same_results(rows, expected):  # Timings aside.
    untimed = lambda row: {k: v for k, v in row.items()
                           if not (k.endswith("seconds") or k == "img_per_sec")}
    assert len(rows) == len(expected)
    for r, e in zip(rows, expected):
      assert untimed(r) == pytest.approx(untimed(e))

  def stop_before(record, unsaved_checkpoints):
    """metrics.jsonl and checkpoints as a run stopped right before writing `record`."""
    kept = first[:first.index(record)]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    for step in unsaved_checkpoints:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    return kept

  # Stopped in step 1's evals, after its checkpoint: val's results were written, val2's not.
  kept = stop_before(val2_at(1)[0], unsaved_checkpoints=[2])
  train.train(config, workdir)
  again = read_metrics(workdir)
  assert again[:len(kept)] == kept
  # val2 at step 1 ran on step 1's parameters, and the run went on as the first one did.
  assert_same_results(again[len(kept):], first[len(kept):])

  # Stopped in the final evals: val2's results at the last step are missing.
  first = again
  kept = stop_before(val2_at(2)[0], unsaved_checkpoints=[])
  train.train(config, workdir)
  again = read_metrics(workdir)
  assert again[:-1] == kept
  assert_same_results(again[-1:], val2_at(2))  # Only val2 ran again.


class FakeCheckpointer:

  def __init__(self, extra):
    self._extra, self.closed = extra, False

  def extra(self, step):
    del step
    return self._extra

  def close(self):
    self.closed = True


def test_resume_on_another_process_count_warns_and_goes_on():
  lines, config = [], fmnist_config("/data", "total_steps=12")
  ckpt = FakeCheckpointer(dict(step=6, examples_seen=6 * 32, process_count=4))
  train._check_resume(ckpt, 6, 32, config, "/w", lines.append)  # This test: 1 process.
  assert not ckpt.closed
  assert len(lines) == 1 and "WARNING" in lines[0], lines
  assert "4 processes and this run has 1" in lines[0]
  assert "Resume on 4 processes" in lines[0]
  # The same count, or a checkpoint from before the count was recorded: nothing to say.
  for extra in (dict(examples_seen=6 * 32, process_count=1), dict(examples_seen=6 * 32)):
    lines.clear()
    train._check_resume(FakeCheckpointer(extra), 6, 32, config, "/w", lines.append)
    assert not lines


@pytest.mark.parametrize("method", ["mae", "dit", "maskdit", "maskdm", "diffmae"])
def test_method_presets_train(data_dir, tmp_path, method):
  config = fmnist_config(data_dir, f"method={method},total_steps=3", log_training_steps=1)
  train.train(config, str(tmp_path / method))
  records = read_metrics(str(tmp_path / method))
  assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
  has_clean = method == "mae"
  assert ("loss_clean" in records[0]) == has_clean
  assert ("loss_noised" in records[0]) == (not has_clean)


def _flat(params):
  return {jax.tree_util.keystr(k): np.array(v)
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_init_from_loads_source_params_and_adds_label_embedding(data_dir, tmp_path,
                                                                monkeypatch, trained_run):
  source = trained_run  # Read only: its checkpoint of step 30.
  pretrained = _flat(checkpointing.load_params(source)[0]["params"])

  # Record the run's own fresh init (merge_params' first argument) and the params that
  # enter each update step; the first are the state before any step.
  fresh, seen = [], []
  real_merge, real_make_update = checkpointing.merge_params, train_step.make_update

  def merge(fresh_params, loaded):
    fresh.append(_flat(fresh_params))  # Copied now: the state is donated to the step.
    return real_merge(fresh_params, loaded)

  def make_update(*args, **kwargs):
    update = real_make_update(*args, **kwargs)

    def recorded(state, batch):
      jax.debug.callback(lambda p, e: seen.append((_flat(p), _flat(e))), state["params"],
                         state["ema_params"])
      return update(state, batch)
    return recorded

  monkeypatch.setattr(checkpointing, "merge_params", merge)
  monkeypatch.setattr(train_step, "make_update", make_update)
  config = fmnist_config(data_dir, f"total_steps=2,use_labels=True,ema=0.9,init_from={source}")
  state, _ = train.train(config, str(tmp_path / "finetune"))
  assert len(fresh) == 1 and len(seen) == 2
  (first, first_ema), fresh = seen[0], fresh[0]
  for key in first:  # The EMA starts at the loaded parameters too.
    np.testing.assert_array_equal(first_ema[key], first[key])

  label = "['y_embedder']['table']['embedding']"
  assert label in first and label not in pretrained and label in _flat(state["params"])
  np.testing.assert_array_equal(first[label], fresh[label])  # New: its fresh init.
  assert set(first) == set(pretrained) | {label}
  for key in ("['patch_embedding']['kernel']", "['encoder']['block_00']['attn']['qkv']['kernel']",
              "['decoder']['block_00']['mlp']['fc1']['kernel']", "['head']['kernel']"):
    # The source's trained values, not this run's own init (same seed, but 30 steps apart).
    assert not np.array_equal(pretrained[key], fresh[key]), key
    np.testing.assert_array_equal(first[key], pretrained[key], err_msg=key)
  for key in pretrained:  # Every source parameter was loaded.
    np.testing.assert_array_equal(first[key], pretrained[key], err_msg=key)


def _run_cli(args, env_extra=None, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "big_vision.train"] + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("arg,message", [
    ("configs/ae_fmnist.py:mask_ratio=1.0", "mask_ratio=1.0 must be a finite number in [0, 1)"),
    ("configs/ae_fmnist.py:variant=Z/4", "unknown variant 'Z/4'"),
    ("configs/ae_fmnist.py:variant=S/5", "is not divisible by the patch size 5"),
    ("configs/ae_fmnist.py:mask_raito=0.5", "unknown config option 'mask_raito'"),
    ("configs/ae_fmnist.py:batch_size=big", "'batch_size' expects an int"),
])
def test_bad_config_fails_in_one_line_before_any_work(tmp_path, arg, message):
  workdir = tmp_path / "never"
  out = _run_cli(["--config", arg, "--workdir", str(workdir)])
  assert out.returncode == 2
  lines = [l for l in out.stderr.strip().splitlines() if "config error" in l]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not workdir.exists()  # Nothing was built, written or compiled.


def test_batch_not_divisible_by_devices(tmp_path, data_dir):
  out = _run_cli(["--config", "configs/ae_fmnist.py:batch_size=7,total_steps=1",
                  "--workdir", str(tmp_path / "w")],
                 env_extra=dict(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                TFDS_DATA_DIR=data_dir))
  assert out.returncode == 2
  assert "batch_size=7 is not divisible by the 2 devices" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "w")  # Refused before the workdir is made.


def test_imagenet_config_two_steps_on_mock_data(tmp_path):
  test_input_pipeline.write_fake_metadata(str(tmp_path / "tfds"), "imagenet2012", 64,
                                          ("train", "validation"))
  config, _ = config_cli.load_from_argv(
      ["--config=configs/ae_i1k.py:variant=Mu/4,size=32,batch_size=8,total_steps=2,"
       "wandb_mode=disabled"])
  config.input.data.data_dir = str(tmp_path / "tfds")
  config.input.data.split = "train"
  config.input.shuffle_buffer_size = 16
  assert set(config.evals) == {"fewshot", "val", "reconstruction"}
  config.evals = ml_collections.ConfigDict()  # 1000 classes of 64 mock images: no probe.
  train.check_trainable(config)
  with tfds.testing.mock_data(num_examples=64, data_dir=str(tmp_path / "tfds"),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    _, metrics = train.train(config, str(tmp_path / "i1k"))
  assert np.isfinite(metrics["loss"])
  assert metrics["loss_clean"] > 0 and metrics["loss_noised"] > 0
