"""The LayerNorms with a hand-written backward pass (AdaLN's, with the modulation, and the
plain one) against autodiff of flax's LayerNorm."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision.models import norm
from tests import test_models


def _reference(x, shift, scale):
  """What the model computed before norm.py: flax's LayerNorm, then the modulation."""
  normed = nn.LayerNorm(use_scale=False, use_bias=False).apply({}, x)
  return normed * (1 + scale) + shift


def _inputs(shift_shape, dtype=jnp.float32, x_shape=(3, 7, 16)):
  kx, ks, kc, kw = jax.random.split(jax.random.PRNGKey(0), 4)
  x = (3 * jax.random.normal(kx, x_shape) + 2).astype(dtype)  # Mean and scale away from 0, 1.
  shift = jax.random.normal(ks, shift_shape).astype(dtype)
  scale = jax.random.normal(kc, shift_shape).astype(dtype)
  weights = jax.random.normal(kw, x_shape)  # A loss that weighs every output differently.
  return x, shift, scale, weights


def _loss_and_grads(fn, x, shift, scale, weights):
  loss = lambda *args: jnp.sum(jnp.sin(fn(*args).astype(jnp.float32)) * weights)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, shift, scale)


# AdaLN's per-image shift and scale, per-feature ones, and ones for each token.
@pytest.mark.parametrize("shift_shape", [(3, 1, 16), (16,), (3, 7, 16)])
def test_values_and_gradients_match_autodiff_of_flax_layer_norm(shift_shape):
  x, shift, scale, weights = _inputs(shift_shape)
  np.testing.assert_allclose(norm.layer_norm_modulate(x, shift, scale),
                             _reference(x, shift, scale), rtol=1e-5, atol=1e-5)
  (want_loss, want), (got_loss, got) = (_loss_and_grads(f, x, shift, scale, weights)
                                        for f in (_reference, norm.layer_norm_modulate))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for name, w, g in zip(("x", "shift", "scale"), want, got):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_gradient_of_x_is_that_of_a_normalisation():
  """LayerNorm's output does not change when x is shifted or scaled per token, so the
  gradient of x has zero mean over features and is orthogonal to x - mean (checked
  without any reference implementation)."""
  x, shift, scale, weights = _inputs((3, 1, 16))
  _, (dx, _, _) = _loss_and_grads(norm.layer_norm_modulate, x, shift, scale, weights)
  np.testing.assert_allclose(dx.sum(-1), 0, atol=1e-5)
  centred = x - x.mean(-1, keepdims=True)
  np.testing.assert_allclose((dx * centred).sum(-1), 0, atol=1e-4)
  assert float(jnp.abs(dx).max()) > 1e-2  # Not trivially zero.


def test_bfloat16_inputs_keep_their_dtypes_and_match_float32():
  x, shift, scale, weights = _inputs((3, 1, 16), jnp.bfloat16)
  y = norm.layer_norm_modulate(x, shift, scale)
  assert y.dtype == jnp.bfloat16
  assert norm.layer_norm_modulate(x, shift.astype(jnp.float32), scale).dtype == jnp.float32
  f32 = [a.astype(jnp.float32) for a in (x, shift, scale)]
  np.testing.assert_allclose(y.astype(jnp.float32), _reference(*f32), rtol=2e-2, atol=3e-2)
  _, grads = _loss_and_grads(norm.layer_norm_modulate, x, shift, scale, weights)
  _, want = _loss_and_grads(_reference, *f32, weights)
  for g, w in zip(grads, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=5e-2,
                               atol=5e-2 * float(jnp.abs(w).max()))


def test_backward_keeps_x_not_float32_copies():
  """For the backward pass it keeps x (bfloat16 here), the per-token statistics and the
  modulation: fewer bytes than autodiff of flax's LayerNorm, which keeps float32 arrays of
  x's size."""
  x, shift, scale, _ = _inputs((3, 1, 16), jnp.bfloat16, x_shape=(3, 64, 16))

  def kept_bytes(fn):
    backward = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], x, shift, scale)
    return sum(l.size * l.dtype.itemsize for l in jax.tree_util.tree_leaves(backward))

  ours, flax_ln = kept_bytes(norm.layer_norm_modulate), kept_bytes(_reference)
  per_token_stats = 2 * 3 * 64 * 4
  assert ours == x.size * 2 + per_token_stats + (shift.size + scale.size) * 2, ours
  assert ours < 0.5 * flax_ln, (ours, flax_ln)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layer_norm_module_is_flax_layer_norm(dtype):
  """norm.LayerNorm has flax's LayerNorm's parameters, outputs and gradients (checkpoints
  of either load in the other)."""
  x, _, _, weights = _inputs((16,))
  ours, flax_ln = norm.LayerNorm(dtype), nn.LayerNorm(dtype=dtype)
  params = flax_ln.init(jax.random.PRNGKey(0), x)
  assert (jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(0), x))
          == jax.tree_util.tree_map(jnp.shape, params))
  params = jax.tree_util.tree_map(lambda p: p + jax.random.normal(jax.random.PRNGKey(1), p.shape),
                                  params)
  assert ours.apply(params, x).dtype == flax_ln.apply(params, x).dtype
  tolerance = dict(rtol=1e-4, atol=1e-5) if dtype is None else dict(rtol=2e-2, atol=5e-2)
  np.testing.assert_allclose(ours.apply(params, x).astype(jnp.float32),
                             flax_ln.apply(params, x).astype(jnp.float32), **tolerance)
  loss = lambda module, p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)) * weights)
  for argnum in (1, 2):  # Parameters, input.
    want, got = (jax.grad(loss, argnum)(module, params, x) for module in (flax_ln, ours))
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, **tolerance), got, want)


def test_model_loss_and_gradients_match_autodiff(monkeypatch):
  """The whole UMD-style model (AdaLN blocks and the final norm) gives the loss and
  gradients it gives with autodiff of flax's LayerNorm in their place."""
  (got_loss, got), (want_loss, want) = test_models.loss_and_grads_as_written_and_with(
      monkeypatch, norm, "layer_norm_modulate", _reference)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6),
                         got, want)
