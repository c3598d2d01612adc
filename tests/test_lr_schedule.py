"""LR schedule edges, gradient clipping inside optimizer.make, step resolution."""
import jax.numpy as jnp
import ml_collections
import pytest

from big_vision import optimizer
from big_vision import steps


def _config(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-3, lr_batch_scaling=256, wd=0.0,
                                     optax=dict(b1=0.9, b2=0.95), grad_clip_norm=1.0,
                                     input=dict(batch_size=256)))
  c.update(kw)
  return c


def test_no_warmup_starts_at_peak_and_decays_over_all_steps():
  """warmup_steps=0 means no warmup: step 0 trains at the peak lr (not at lr 0)."""
  fn = optimizer.lr_schedule(_config(), total_steps=10, warmup_steps=0)
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
    tx, _ = optimizer.make(_config(grad_clip_norm=clip), params, total_steps=10,
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
