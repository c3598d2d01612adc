"""Shared pytest set-up: run JAX on the CPU and keep TensorFlow off accelerators."""
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Fashion-MNIST prepared once per test process (from Debian's files), for every module."""
  from big_vision import input_pipeline  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_dataset_builder("fashion_mnist_local", path)
  return path
