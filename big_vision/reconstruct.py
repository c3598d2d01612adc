"""Masked reconstruction of images: what the model fills in where it cannot see.

Shared by the trainer's PNG grids and the reconstruction evaluator.
"""
import jax
import jax.numpy as jnp

from big_vision import config_parsing
from big_vision import objective
from big_vision.models import masking as masking_lib


def reconstruct(apply_fn, params, images, rng, *, mask_ratio, grid, patch_size, t=None,
                diffusion=None, labels=None, noised_queries=False, masking=None):
  """One-step x0 reconstruction of masked (and optionally noised) images.

  Args:
    apply_fn: (params, images, t, labels, mask_ratio= or masking=, rngs=[, noised=]) ->
      model outputs.
    images: clean [B, H, W, C] in [-1, 1].
    t: None for clean inputs, else an int diffusion step (0-based) applied to all images.
    noised_queries: a DiffMAE model: the encoder sees the clean visible patches and the
      decoder the masked ones noised at t; with t=None, at the last step (pure noise, the
      one-step reconstruction that MAE's is).
    masking: a masking.Masking to use (passed as masking=) instead of one drawn at
      mask_ratio.
  Returns:
    dict(input=what the model saw, masked patches grey (DiffMAE: noised); prediction=x0
         everywhere (the x0 head's on masked pixels; on the visible pixels of noised
         inputs, x0 from the eps head, which is what training scores there; DiffMAE's
         visible pixels are the images');
         reconstruction=visible pixels of the original + predicted masked pixels;
         mask=[B,H,W,1] pixel mask).
  """
  if noised_queries and t is None:
    if diffusion is None:
      raise ValueError("noised_queries needs the diffusion (diffusion=None) to noise the "
                       "masked patches")
    t = diffusion.num_timesteps - 1
  if t is not None:
    if diffusion is None:
      raise ValueError(f"t={t!r} needs the diffusion (diffusion=None) to noise the images")
    n = diffusion.num_timesteps
    if not (config_parsing.is_int(t) and 0 <= t < n):
      raise ValueError(f"t={t!r} must be None (clean) or an int in [0, {n}) (0-based step)")
  b = images.shape[0]
  rng_mask, rng_noise = jax.random.split(rng)
  if t is None:
    x_in, t_model = images, jnp.zeros((b,), jnp.int32)
  else:
    t_arr = jnp.full((b,), t, jnp.int32)
    x_in = diffusion.q_sample(images, t_arr, jax.random.normal(rng_noise, images.shape))
    t_model = t_arr + 1  # The network keeps t = 0 for clean inputs.
  x, queries = objective.model_inputs(images, x_in, noised_queries)
  how = dict(mask_ratio=mask_ratio) if masking is None else dict(masking=masking)
  out = apply_fn(params, x, t_model, labels, rngs={"mask": rng_mask, "dropout": rng_mask},
                 **how, **queries)
  mask = masking_lib.mask_to_pixels(out["mask"], grid, patch_size)
  x0 = out["x0"]
  if noised_queries:  # The visible patches are known.
    x0, x_in = jnp.where(mask > 0, x0, images), jnp.where(mask > 0, x_in, images)
  elif t is not None:  # No method trains the x0 head on visible noised pixels (DiT: nowhere).
    x0 = jnp.where(mask > 0, x0, diffusion.predict_x0_from_eps(x_in, t_arr, out["eps"]))
  prediction = jnp.clip(x0, -1.0, 1.0)
  return dict(input=x_in if noised_queries else jnp.where(mask > 0, 0.0, x_in),
              prediction=prediction,
              reconstruction=jnp.where(mask > 0, prediction, images),
              mask=mask)
