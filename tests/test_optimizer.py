"""AdamW recipe: which parameters decay, the learning-rate schedule (no warmup too),
clipping inside optimizer.make, EMA, and run lengths that steps.resolve refuses."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision import optimizer
from big_vision import steps
from big_vision.models import ae


def _config(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-3, lr_batch_scaling=256, wd=0.1,
                                     optax=dict(b1=0.9, b2=0.95), grad_clip_norm=1.0,
                                     input=dict(batch_size=512)))
  c.update(kw)
  return c


def test_decay_mask_on_model_params():
  model = ae.build_model(dict(variant="Mu/4", image_size=16, num_classes=3))
  params = ae.init_shapes(model)
  mask = optimizer.decay_mask(params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = {k for k, v in flat.items() if v}
  assert "['patch_embedding']['kernel']" in decayed
  assert "['encoder']['block_00']['attn']['qkv']['kernel']" in decayed
  for name in ("['cls']", "['mask_token']", "['patch_embedding']['bias']",
               "['y_embedder']['table']['embedding']", "['encoder_norm']['scale']"):
    assert name in flat and name not in decayed, name


def test_lr_schedule_scaled_warmup_cosine():
  fn = optimizer.lr_schedule(_config(), total_steps=100, warmup_steps=10)
  peak = 1e-3 * 512 / 256
  assert float(fn(0)) == 0.0
  assert float(fn(5)) == pytest.approx(peak / 2, rel=1e-5)
  assert float(fn(10)) == pytest.approx(peak, rel=1e-5)
  assert float(fn(55)) == pytest.approx(peak / 2, rel=1e-3)  # Cosine half-way.
  assert float(fn(100)) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_only_where_masked():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  tx, _ = optimizer.make(_config(lr=0.0), params, total_steps=10, warmup_steps=0)
  state = tx.init(params)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  # lr = 0 -> no change at all; now a real lr with zero gradients: only decay acts.
  assert float(jnp.abs(updates["dense"]["kernel"]).max()) == 0.0
  tx, _ = optimizer.make(_config(), params, total_steps=10, warmup_steps=1)
  _, state = tx.update(zero, tx.init(params), params)  # Step 0 has lr 0 (warmup).
  updates, _ = tx.update(zero, state, params)
  assert float(updates["dense"]["kernel"][0, 0]) < 0
  assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0


def test_ema_update():
  ema = optimizer.ema_update({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, 0.9)
  np.testing.assert_allclose(ema["w"], 0.1)


def test_steps_resolution():
  c = ml_collections.ConfigDict(dict(total_epochs=2.0, warmup_fraction=0.1))
  assert steps.resolve(c, "total", 1000, 128) == 16
  assert steps.resolve(c, "warmup", 1000, 128) == 2
  c = ml_collections.ConfigDict(dict(total_steps=50))
  assert steps.resolve(c, "total", 1000, 128) == 50
  assert steps.resolve(c, "warmup", 1000, 128, default=0) == 0
  with pytest.raises(ValueError, match="total_steps or total_epochs"):
    steps.resolve(ml_collections.ConfigDict(), "total", 10, 2)


def test_no_warmup_starts_at_peak_and_decays_over_all_steps():
  """warmup_steps=0 means no warmup: step 0 trains at the peak lr (not at lr 0)."""
  c = _config()
  c.input.batch_size = 256  # Peak lr 1e-3.
  fn = optimizer.lr_schedule(c, total_steps=10, warmup_steps=0)
  peak = 1e-3
  assert float(fn(0)) == pytest.approx(peak, rel=1e-6)
  assert float(fn(5)) == pytest.approx(peak / 2, rel=1e-5)  # Cosine half-way.
  assert float(fn(10)) == pytest.approx(0.0, abs=1e-12)


def test_optimizer_make_clips_gradients():
  """optimizer.make's chain clips by global norm (Adam is scale-free per step, so look at
  the second step: a clipped huge first gradient no longer dominates the momentum)."""
  params = {"w": jnp.ones((2, 2))}
  g1 = {"w": jnp.full((2, 2), 1e3)}    # Norm 2e3: clipped to norm 1 (0.5 per entry).
  g2 = {"w": jnp.full((2, 2), -0.5)}   # Norm 1: not clipped.

  def second_update(clip):
    tx, _ = optimizer.make(_config(grad_clip_norm=clip, wd=0.0), params, total_steps=10,
                           warmup_steps=1)
    state = tx.init(params)
    _, state = tx.update(g1, state, params)
    updates, _ = tx.update(g2, state, params)
    return float(updates["w"][0, 0])

  # Clipped: m = 0.1 * 0.9 * 0.5 - 0.1 * 0.5 < 0, so the update is positive.
  assert second_update(1.0) > 0
  # Unclipped: m = 0.1 * 0.9 * 1e3 - 0.05 > 0, the update is negative.
  assert second_update(0.0) < 0


@pytest.mark.parametrize("fraction", [-0.1, 1.5, 5.0])
def test_warmup_fraction_outside_unit_interval_is_clear(fraction):
  c = ml_collections.ConfigDict(dict(total_steps=100, warmup_fraction=fraction))
  with pytest.raises(ValueError, match=rf"warmup_fraction={fraction} .*\[0, 1\]"):
    steps.resolve(c, "warmup", 1000, 10)


@pytest.mark.parametrize("key,value", [("total_steps", -5), ("total_epochs", -1.0),
                                       ("warmup_steps", -3)])
def test_negative_lengths_are_clear(key, value):
  c = ml_collections.ConfigDict({key: value})
  name = key.rsplit("_", 1)[0]
  with pytest.raises(ValueError, match=rf"{key}={value} must be >= 0"):
    steps.resolve(c, name, 1000, 10)
