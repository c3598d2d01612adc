"""The GELU with a hand-written backward pass against autodiff of jax.nn.gelu."""
import jax
import jax.numpy as jnp
import numpy as np

from big_vision.models import gelu
from tests import test_models


def _reference(x):
  return jax.nn.gelu(x, approximate=True)


def _inputs(dtype=jnp.float32, shape=(3, 7, 32)):
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = (4 * jax.random.normal(kx, shape)).astype(dtype)  # Both tails and the bend near 0.
  return x, jax.random.normal(kw, shape)  # Weights: every output's gradient differs.


def _loss_and_grad(fn, x, weights):
  loss = lambda x: jnp.sum(jnp.sin(fn(x).astype(jnp.float32)) * weights)
  return jax.jit(jax.value_and_grad(loss))(x)


def test_values_and_gradient_match_autodiff():
  x, weights = _inputs()
  np.testing.assert_array_equal(gelu.gelu(x), _reference(x))  # Its forward pass.
  (want_loss, want), (got_loss, got) = (_loss_and_grad(f, x, weights)
                                        for f in (_reference, gelu.gelu))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  # Float32 rounding: in the negative tail the derivative is a difference of numbers
  # near 1, computed in another order than autodiff's.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got).max()) > 0.1


def _gelu_float64(x):
  """The tanh approximation's definition, in float64."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_derivative_is_the_slope():
  """Against central differences in float64, no autodiff involved: near 0 (0.5), in the
  tails (0 and 1), at the minimum near x = -0.75."""
  x = np.linspace(-8, 8, 321)
  h = 1e-5
  slope = (_gelu_float64(x + h) - _gelu_float64(x - h)) / (2 * h)
  # Float32 rounding where the derivative is a sum of terms that cancel (x < -2): 3.5e-6
  # at most here, as for autodiff of jax.nn.gelu.
  np.testing.assert_allclose(gelu.derivative(x.astype(np.float32)), slope, atol=5e-6)
  np.testing.assert_allclose(gelu.derivative(jnp.array([0.0, -10.0, 10.0])), [0.5, 0.0, 1.0],
                             atol=1e-6)


def test_bfloat16_keeps_its_dtype_and_matches_float32():
  x, weights = _inputs(jnp.bfloat16)
  assert gelu.gelu(x).dtype == jnp.bfloat16
  _, got = _loss_and_grad(gelu.gelu, x, weights)
  _, want = _loss_and_grad(_reference, x.astype(jnp.float32), weights)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2,
                             atol=2e-2 * float(jnp.abs(want).max()))


def test_backward_keeps_only_x():
  """Autodiff of jax.nn.gelu keeps four arrays of x's size; this one keeps x."""
  x, _ = _inputs(jnp.bfloat16)

  def kept(fn):
    backward = jax.eval_shape(lambda x: jax.vjp(fn, x)[1], x)
    return [(l.shape, l.dtype) for l in jax.tree_util.tree_leaves(backward)
            if l.size == x.size]

  assert kept(gelu.gelu) == [(x.shape, x.dtype)]
  assert len(kept(_reference)) >= 3, kept(_reference)


def test_model_loss_and_gradients_match_autodiff(monkeypatch):
  """The whole model gives the loss and gradients it gives with jax.nn.gelu's autodiff."""
  (got_loss, got), (want_loss, want) = test_models.loss_and_grads_as_written_and_with(
      monkeypatch, gelu, "gelu", _reference)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7),
                         got, want)
