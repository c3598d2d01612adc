"""Eval batch sizes against the number of devices the eval batches are sharded over."""
import types

import numpy as np
import pytest

from big_vision.config_parsing import ConfigError
from big_vision.evaluators import common
from tests.test_evaluators import feature_net_weights  # pylint: disable=unused-import
from tests.test_evaluators import make_context


def _on_devices(ctx, n):
  ctx.mesh = types.SimpleNamespace(devices=np.empty(n, object))  # Only its size is used.
  return ctx


def test_evaluators_own_batch_sizes_fit_the_devices(data_dir, tmp_path, feature_net_weights):
  from big_vision.evaluators import inpainting
  from big_vision.evaluators import sampling
  ctx, _ = make_context(data_dir, str(tmp_path))
  _on_devices(ctx, 8)
  net = dict(kind="fmnist_classifier", weights=feature_net_weights)
  ev = sampling.Evaluator(ctx, num_samples=16, feature_net=net)
  assert ev.scorer.reference_cfg["batch_size"] % 8 == 0
  assert ev.floor_cfg["batch_size"] % 8 == 0
  ev = inpainting.Evaluator(ctx, batch_size=8, feature_net=net)
  assert ev.scorer.reference_cfg["batch_size"] % 8 == 0
  _on_devices(ctx, 3)  # The default eval batch, too.
  assert common.eval_input_config(ctx, split="test")["batch_size"] % 3 == 0


def test_indivisible_eval_batch_size_is_one_clear_error(data_dir, tmp_path):
  ctx, _ = make_context(data_dir, str(tmp_path))
  _on_devices(ctx, 8)
  with pytest.raises(ConfigError, match="batch_size=100 is not divisible by the 8 devices"):
    common.eval_input_config(ctx, batch_size=100, split="test")
  assert common.eval_input_config(ctx, batch_size=64, split="test")["batch_size"] == 64
