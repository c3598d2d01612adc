"""AdamW recipe: which parameters decay, the learning-rate schedule, clipping, EMA."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
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


def test_weight_decay_only_where_masked_and_clipping():
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
  # Clipping by global norm: a huge gradient gives the same first Adam step as a clipped one.
  big = jax.tree_util.tree_map(lambda x: 1e6 * jnp.ones_like(x), params)
  clip = optax.clip_by_global_norm(1.0)
  clipped, _ = clip.update(big, clip.init(params))
  assert float(optimizer.global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)


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
