"""A workdir given as a URL (gs://bucket/run on TPU pods) gets every file the trainer and
eval_only write, through etils.epath; nothing lands in a local ./gs:/ folder.

No bucket is reachable here: `bucket` maps gs://... onto a local folder by swapping
fileio's path factory (and checkpointing's, for orbax), and refuses appends as GCS does.
"""
import json
import os

from etils import epath
import ml_collections
from PIL import Image
import pytest

from big_vision import checkpointing
from big_vision import fileio
from big_vision import metric_writer
from big_vision import train
from big_vision import visualize
from big_vision.tools import eval_only
from tests.test_train import fmnist_config
from tests.test_train import ROOT

RUN = "gs://my-bucket/umd_run"


class BucketPath(type(epath.Path("/"))):
  """A local epath path that, like an object store, cannot be opened for appending and
  needs no folder to write an object in."""

  def open(self, mode="r", *args, **kwargs):  # pylint: disable=keyword-arg-before-vararg
    assert "a" not in mode and "+" not in mode, f"append to {self} on an object store"
    if "w" in mode:
      os.makedirs(os.path.dirname(self), exist_ok=True)
    return super().open(mode, *args, **kwargs)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """Serves gs://... from tmp_path/bucket; returns local(url) -> that folder's path. The
  test runs in an empty tmp_path/cwd, checked at the end for stray ./gs:/ folders."""
  root = tmp_path / "bucket"
  root.mkdir()

  def local(path):
    path = os.fspath(path)
    return str(root / path[len("gs://"):]) if path.startswith("gs://") else path

  real_path, real_absolute = fileio._path, checkpointing._absolute  # pylint: disable=protected-access
  monkeypatch.setattr(fileio, "_path", lambda p: (
      BucketPath(local(p)) if fileio.is_remote(p) else real_path(p)))
  monkeypatch.setattr(checkpointing, "_absolute", lambda p: local(real_absolute(p)))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield local
  assert not os.listdir(cwd), f"written under the cwd: {os.listdir(cwd)}"


def records(text):
  return [json.loads(line) for line in text.splitlines()]


def test_fileio_local_paths(tmp_path):
  assert not fileio.is_remote(str(tmp_path)) and fileio.is_remote("gs://b/run")
  assert fileio.absolute("gs://b/run/") == "gs://b/run"
  assert fileio.absolute("run") == os.path.abspath("run")
  path = str(tmp_path / "a" / "b" / "x.txt")
  fileio.makedirs(os.path.dirname(path))
  fileio.makedirs(os.path.dirname(path))  # Exists already: fine.
  assert not fileio.exists(path)
  fileio.write_text(path, "hello")
  assert fileio.exists(path) and fileio.read_text(path) == "hello"
  fileio.write_bytes(path, b"\x89PNG")
  assert open(path, "rb").read() == b"\x89PNG"


def test_fileio_remote_paths_go_to_the_bucket(bucket):
  fileio.makedirs("gs://b/run/images")
  fileio.write_text("gs://b/run/config.json", "{}")
  assert fileio.exists("gs://b/run/config.json")
  assert fileio.read_text("gs://b/run/config.json") == "{}"
  assert open(bucket("gs://b/run/config.json")).read() == "{}"
  with pytest.raises(AssertionError, match="append"):  # The fake is as strict as GCS.
    with fileio._path("gs://b/run/config.json").open("a"):  # pylint: disable=protected-access
      pass


def test_visualize_writes_pngs_to_the_bucket(bucket):
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = visualize.image_grid([np.zeros((2, 4, 4, 1))], f"{RUN}/images/x.png")
  assert path == f"{RUN}/images/x.png"
  assert Image.open(bucket(path)).format == "PNG"
  fileio.write_text(f"{RUN}/metrics.jsonl", '{"step": 1, "loss": 1.0}\n'
                    '{"step": 2, "loss": 0.5}\n')
  visualize.loss_curve(f"{RUN}/metrics.jsonl", f"{RUN}/loss_curve.png")
  assert Image.open(bucket(f"{RUN}/loss_curve.png")).format == "PNG"


def test_metric_writer_rewrites_remote_file_and_drops_after_resume(bucket):
  config = ml_collections.ConfigDict(dict(wandb=dict(mode="disabled")))
  fileio.makedirs(RUN)
  steps_in_bucket = lambda: [r["step"] for r in records(
      open(bucket(f"{RUN}/metrics.jsonl")).read())]
  now = [0.0]
  writer = metric_writer.MetricWriter(RUN, config, upload_seconds=60, clock=lambda: now[0])
  writer.write(1, {"loss": 1.0})
  assert not os.path.exists(bucket(f"{RUN}/metrics.jsonl"))  # Not yet a minute.
  now[0] = 60.0
  writer.write(2, {"loss": 0.5})  # A minute on: the whole file goes up.
  assert steps_in_bucket() == [1, 2]
  writer.write(3, {"loss": 0.3})
  assert steps_in_bucket() == [1, 2]
  writer.flush()  # What the trainer does before a checkpoint.
  assert steps_in_bucket() == [1, 2, 3]
  writer.write(4, {"loss": 0.25})
  writer.close()
  assert steps_in_bucket() == [1, 2, 3, 4]
  # Resumed from step 2: 3 and 4 are forgotten, then logged again.
  writer = metric_writer.MetricWriter(RUN, config, resume_step=2)
  assert steps_in_bucket() == [1, 2]
  writer.write(3, {"loss": 0.3})
  writer.close()
  assert steps_in_bucket() == [1, 2, 3]
  # Not the main process: writes nothing.
  writer = metric_writer.MetricWriter(RUN, config, is_main=False)
  writer.write(9, {"loss": 0.0})
  writer.close()
  assert steps_in_bucket() == [1, 2, 3]


def test_wandb_of_a_remote_workdir_goes_to_a_local_folder(bucket, tmp_path, monkeypatch,
                                                          capsys):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  local = metric_writer._wandb_dir(RUN)  # pylint: disable=protected-access
  assert local.startswith(str(tmp_path / "home" / ".cache")) and os.path.isdir(local)
  assert local in capsys.readouterr().out
  assert metric_writer._wandb_dir(str(tmp_path)) == str(tmp_path)  # pylint: disable=protected-access
  run_id = metric_writer._run_id(RUN)  # pylint: disable=protected-access
  assert open(bucket(f"{RUN}/wandb_id.txt")).read() == run_id
  assert metric_writer._run_id(RUN) == run_id  # pylint: disable=protected-access


def test_train_and_eval_only_with_a_remote_workdir(data_dir, bucket):
  cwd = os.getcwd()
  os.chdir(ROOT)  # The config file is relative to the repository.
  try:
    config = fmnist_config(data_dir, "total_steps=2", log_training_steps=1)
  finally:
    os.chdir(cwd)
  config.evals = ml_collections.ConfigDict(dict(val=dict(
      type="diffusion_loss", split="test[:32]", num_ranges=1)))
  train.train(config, RUN)
  run = bucket(RUN)
  assert json.load(open(os.path.join(run, "config.json")))["total_steps"] == 2
  steps = [r["step"] for r in records(open(os.path.join(run, "metrics.jsonl")).read())]
  assert steps == [1, 2, 2]  # Two training records, then the final eval's.
  png = os.path.join(run, "images", "reconstruction_0000002.png")
  assert Image.open(png).format == "PNG"
  assert Image.open(os.path.join(run, "loss_curve.png")).format == "PNG"
  assert os.listdir(os.path.join(run, "checkpoints")) == ["2"]

  # eval_only on the run: its config.json from the bucket, results appended to its metrics.
  assert eval_only.run_config_path(RUN, f"{RUN}/checkpoints/2/") == f"{RUN}/config.json"
  result = eval_only.evaluate(None, RUN)
  assert result["val/loss"] > 0
  last = records(open(os.path.join(run, "metrics.jsonl")).read())
  assert [r["step"] for r in last] == [1, 2, 2, 2] and "val/loss" in last[-1]
