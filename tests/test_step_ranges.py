"""Out-of-range diffusion steps are clear errors, not silently clamped."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision import diffusion as D
from big_vision import reconstruct

D10 = D.GaussianDiffusion.create("cosine", 10)


@pytest.mark.parametrize("t", [10, -1, [3, 10]])
def test_q_sample_rejects_steps_outside_range(t):
  # JAX gathers clamp out-of-range indices: t = T would silently reuse step T - 1.
  x = jnp.ones((np.size(t), 2))
  with pytest.raises(ValueError, match=r"t=.* must lie in \[0, 10\)"):
    D10.q_sample(x, jnp.asarray(t), x)


def test_in_range_and_traced_steps_still_work():
  x = jnp.ones((2, 2))
  np.testing.assert_allclose(D10.q_sample(x, jnp.array([0, 9]), 0 * x)[:, 0],
                             D10.sqrt_alphas_cumprod[[0, 9]], rtol=1e-6)
  f = jax.jit(lambda t: D10.q_sample(x, t, x))
  assert f(jnp.array([1, 2])).shape == (2, 2)


def _fake_apply(params, images, t, labels, *, mask_ratio, rngs):
  del params, labels, mask_ratio, rngs
  return dict(x0=images, mask=jnp.zeros((images.shape[0], 4)))


@pytest.mark.parametrize("t,diffusion,match", [
    (3, None, r"t=3 needs the diffusion"),
    (10, D10, r"t=10 must be None \(clean\) or an int in \[0, 10\)"),
    (-1, D10, r"t=-1 must be None"),
])
def test_reconstruct_bad_t_is_clear(t, diffusion, match):
  with pytest.raises(ValueError, match=match):
    reconstruct.reconstruct(_fake_apply, None, jnp.zeros((1, 4, 4, 1)), jax.random.PRNGKey(0),
                            mask_ratio=0.5, grid=(2, 2), patch_size=2, t=t,
                            diffusion=diffusion)
