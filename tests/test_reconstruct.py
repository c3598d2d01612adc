"""One-step reconstructions (the trainer's pictures, the reconstruction evaluator): each
pixel's prediction comes from the head that training scores there."""
import jax
import jax.numpy as jnp
import numpy as np

from big_vision import diffusion as diffusion_lib
from big_vision import reconstruct

DIFFUSION = diffusion_lib.GaussianDiffusion.create("cosine", 100)
MASK = jnp.array([[1.0, 0.0, 0.0, 1.0]])  # Patches 0 and 3 of a 2x2 grid of 2x2 patches.


def _fake_apply(x0_value, eps_fn):
  """x0 head: a constant; eps head: eps_fn(inputs, t); the fixed mask above."""
  def apply(params, images, t, labels, *, mask_ratio, rngs):
    del params, labels, mask_ratio, rngs
    return dict(x0=jnp.full_like(images, x0_value), eps=eps_fn(images, t), mask=MASK)
  return apply


def test_noised_prediction_takes_masked_x0_and_visible_x0_from_eps():
  images = jax.random.uniform(jax.random.PRNGKey(0), (1, 4, 4, 1), minval=-0.9, maxval=0.9)
  rng, t = jax.random.PRNGKey(1), 30
  noise = jax.random.normal(jax.random.split(rng)[1], images.shape)  # reconstruct's draw.
  # An eps head that knows the noise: x0 from it is the image itself.
  r = reconstruct.reconstruct(_fake_apply(0.5, lambda x, t_in: noise), None, images, rng,
                              mask_ratio=0.5, grid=(2, 2), patch_size=2, t=t,
                              diffusion=DIFFUSION)
  pixel_mask = np.kron(np.asarray(MASK).reshape(2, 2), np.ones((2, 2)))[None, :, :, None]
  expected = np.where(pixel_mask > 0, 0.5, np.asarray(images))
  np.testing.assert_allclose(r["prediction"], expected, atol=1e-5)
  np.testing.assert_allclose(r["reconstruction"], expected, atol=1e-5)
  np.testing.assert_array_equal(r["mask"], pixel_mask)


def test_clean_prediction_is_the_x0_head():
  images = jnp.zeros((1, 4, 4, 1))
  r = reconstruct.reconstruct(_fake_apply(0.25, lambda x, t_in: jnp.ones_like(x)), None,
                              images, jax.random.PRNGKey(0), mask_ratio=0.5, grid=(2, 2),
                              patch_size=2)
  np.testing.assert_allclose(r["prediction"], 0.25)


def test_diffmae_sees_clean_images_and_masked_patches_from_pure_noise():
  """DiffMAE (noised_queries): the model gets the clean images and, without t, the masked
  patches noised at the last step (pure noise: MAE's one step); visible pixels are known."""
  images = jax.random.uniform(jax.random.PRNGKey(0), (1, 4, 4, 1), minval=-0.9, maxval=0.9)
  seen = {}

  def apply(params, x, t, labels, *, mask_ratio, noised, rngs):
    del params, labels, mask_ratio, rngs
    seen.update(images=x, t=t, noised=noised)
    return dict(x0=jnp.full_like(x, 0.5), eps=jnp.zeros_like(x), mask=MASK)

  r = reconstruct.reconstruct(apply, None, images, jax.random.PRNGKey(1), mask_ratio=0.5,
                              grid=(2, 2), patch_size=2, diffusion=DIFFUSION,
                              noised_queries=True)
  np.testing.assert_array_equal(seen["images"], images)
  np.testing.assert_array_equal(seen["t"], [100])  # The last step, fed as t + 1.
  noise = jax.random.normal(jax.random.split(jax.random.PRNGKey(1))[1], images.shape)
  np.testing.assert_allclose(seen["noised"], DIFFUSION.q_sample(
      images, jnp.array([99]), noise), atol=1e-6)
  pixel_mask = np.kron(np.asarray(MASK).reshape(2, 2), np.ones((2, 2)))[None, :, :, None]
  np.testing.assert_allclose(r["prediction"], np.where(pixel_mask > 0, 0.5, images), atol=1e-6)
  np.testing.assert_allclose(r["input"], np.where(pixel_mask > 0, seen["noised"], images))
