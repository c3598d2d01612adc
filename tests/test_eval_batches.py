"""Eval batch sizes against the number of devices the eval batches are sharded over."""
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
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


def test_iterate_counts_exactly_max_examples(monkeypatch):
  # 3 batches of 4 with max_examples=6: the second batch's last two rows become padding,
  # so the means of diffusion_loss and reconstruction are over exactly 6 images.
  from big_vision import input_pipeline  # pylint: disable=g-import-not-at-top
  batch = lambda: {"image": np.arange(4.0), input_pipeline.MASK_KEY: np.ones(4, bool)}
  monkeypatch.setattr(input_pipeline, "evaluation", lambda cfg: ("ds", 12))
  monkeypatch.setattr(input_pipeline, "start_global",
                      lambda ds, sharding, n_prefetch: iter([batch() for _ in range(3)]))
  context = types.SimpleNamespace(data_sharding=None)
  cfg = dict(data=dict(name="fmnist", split="test"), pp="", batch_size=4)
  masks = [np.asarray(b[input_pipeline.MASK_KEY]) for b in common.iterate(context, cfg, 6)]
  np.testing.assert_array_equal(np.concatenate(masks), [1, 1, 1, 1, 1, 1, 0, 0])
  got = common.collect(context, cfg, lambda b: {"x": b["image"]}, 6)["x"]
  np.testing.assert_array_equal(got, [0, 1, 2, 3, 0, 1])


def test_inpainting_default_batch_fits_the_devices(data_dir, tmp_path):
  from big_vision.evaluators import inpainting
  ctx, _ = make_context(data_dir, str(tmp_path))
  _on_devices(ctx, 3)  # The default 64 does not divide: rounded up, as sampling's.
  assert inpainting.Evaluator(ctx).input_cfg["batch_size"] == 66
  with pytest.raises(ConfigError, match="batch_size=64 is not divisible by the 3 devices"):
    inpainting.Evaluator(ctx, batch_size=64)  # Given: must divide.


def test_inpainting_masks_blocks_for_a_block_masking_model(data_dir, tmp_path):
  """A model trained with masking="block" is inpainted on block masks (here 2x2 blocks of
  7x7 patches of 2x2 pixels: quadrants of the image), and its grid is named after its eval."""
  ctx, params = make_context(data_dir, str(tmp_path),
                             "variant=Mu/2,masking=block,mask_block_size=7")
  evals = ml_collections.ConfigDict(dict(evals=dict(inp2=dict(
      type="inpainting", max_examples=4, batch_size=4, sampling_timesteps=2,
      split="test[:4]"))))
  ev = common.build(evals, ctx, 100, 10)[0].evaluator
  out = ev._run_batch(params, jnp.ones((4, 28, 28, 1)), jax.random.PRNGKey(0))
  hidden = np.asarray(out["masked"] == 0).reshape(4, 2, 14, 2, 14)
  per_quadrant = hidden.sum(axis=(2, 4))
  assert set(np.unique(per_quadrant)) == {0, 196}, per_quadrant  # Whole quadrants.
  assert (per_quadrant.sum(axis=(1, 2)) == 2 * 196).all()  # Half of them.
  dict(ev.run(params, 3))
  assert os.listdir(tmp_path / "images") == ["inp2_0000003.png"]
