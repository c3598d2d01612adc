"""Files of a workdir that may be local or a URL (gs://bucket/run on TPU pods).

Everything goes through etils.epath, which serves gs:// (and s3://, ...) with tf.io.gfile
or fsspec and local paths with the os; os.path would turn gs://b/run into a local ./gs:/b/run.
Object stores cannot append: see metric_writer for how metrics.jsonl copes.
"""
import os

from etils import epath


def is_remote(path):
  return "://" in os.fspath(path)


def absolute(path):
  """A local path made absolute; URLs stay as they are, less a trailing slash."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def _path(path):
  """The epath.Path of a path or URL (tests swap this for a fake bucket)."""
  return epath.Path(path)


def makedirs(path):
  _path(absolute(path)).mkdir(parents=True, exist_ok=True)


def exists(path):
  return _path(path).exists()


def read_text(path):
  return _path(path).read_text()


def write_text(path, text):
  _path(path).write_text(text)


def write_bytes(path, data):
  _path(path).write_bytes(data)
