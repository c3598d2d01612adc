"""The UMD training objective, of which MAE, DiT and MaskDiT are presets.

Each batch is split (statically, so shapes are known to jit):
  - the first round(B * no_noise_prob) images stay clean (t = 0), are masked with
    `mask_ratio_no_noise`, and are scored by the x0 error on masked pixels;
  - the rest are noised at t ~ U{0..T-1} (fed to the network as t + 1, keeping 0 for
    clean), masked with `mask_ratio`, and scored by the mean of the eps error on visible
    pixels and the x0 error on masked pixels.
The total is the two branch losses weighted by their share of the batch. A branch with
no masked pixels scores what it can: x0 on all pixels (clean) or eps on all pixels (noised).
"""
import jax
import jax.numpy as jnp

from big_vision.models import masking as masking_lib


def split_sizes(batch_size, no_noise_prob):
  """(clean, noised) image counts of a batch."""
  clean = int(round(batch_size * no_noise_prob))
  return clean, batch_size - clean


def _masked_mse(pred, target, weight):
  """Mean squared error over the pixels where weight [B,H,W,1] is 1."""
  channels = pred.shape[-1]
  err = jnp.sum(jnp.square(pred - target) * weight)
  return err / jnp.maximum(jnp.sum(weight) * channels, 1.0)


def clean_branch_loss(out, images, grid, patch_size, any_masked=True):
  """x0 error on masked pixels (on all pixels when the branch masks nothing)."""
  if not any_masked:
    return _masked_mse(out["x0"], images, jnp.ones(images.shape[:-1] + (1,)))
  return _masked_mse(out["x0"], images, masking_lib.mask_to_pixels(out["mask"], grid, patch_size))


def noised_branch_loss(out, images, noise, grid, patch_size, any_masked=True):
  """Mean of eps error on visible pixels and x0 error on masked pixels."""
  if not any_masked:
    return _masked_mse(out["eps"], noise, jnp.ones(images.shape[:-1] + (1,)))
  masked = masking_lib.mask_to_pixels(out["mask"], grid, patch_size)
  return 0.5 * (_masked_mse(out["eps"], noise, 1.0 - masked)
                + _masked_mse(out["x0"], images, masked))


def umd_loss(apply_fn, params, images, labels, rng, diffusion, *, no_noise_prob, mask_ratio,
             mask_ratio_no_noise, grid, patch_size, train=True):
  """Returns (loss, metrics) for one batch.

  Args:
    apply_fn: (params, images, t, labels, mask_ratio=, train=, rngs=) -> model outputs.
    params: the model parameters.
    images: [B, H, W, C] in [-1, 1].
    labels: [B] int labels or None.
    rng: PRNG key for masks, noise, time steps and label dropout.
    diffusion: a GaussianDiffusion (num_timesteps, q_sample).
    no_noise_prob, mask_ratio, mask_ratio_no_noise: the objective's knobs.
    grid, patch_size: the model's patch grid, to turn token masks into pixel masks.
    train: passes train=True to the model (label dropout).
  """
  b = images.shape[0]
  n_clean, n_noised = split_sizes(b, no_noise_prob)
  rng_clean, rng_noised, rng_t, rng_eps = jax.random.split(rng, 4)
  take = lambda x, s: None if x is None else x[s]
  metrics, loss = {}, 0.0

  if n_clean:
    sl = slice(0, n_clean)
    x0 = images[sl]
    out = apply_fn(params, x0, jnp.zeros((n_clean,), jnp.int32), take(labels, sl),
                   mask_ratio=mask_ratio_no_noise, train=train, rngs=_rngs(rng_clean))
    clean = clean_branch_loss(out, x0, grid, patch_size, any_masked=mask_ratio_no_noise > 0)
    metrics["loss_clean"] = clean
    loss = loss + clean * (n_clean / b)

  if n_noised:
    sl = slice(n_clean, b)
    x0 = images[sl]
    t = jax.random.randint(rng_t, (n_noised,), 0, diffusion.num_timesteps)
    noise = jax.random.normal(rng_eps, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(x0, t, noise)
    out = apply_fn(params, x_t, t + 1, take(labels, sl), mask_ratio=mask_ratio,
                   train=train, rngs=_rngs(rng_noised))
    noised = noised_branch_loss(out, x0, noise, grid, patch_size, any_masked=mask_ratio > 0)
    metrics["loss_noised"] = noised
    loss = loss + noised * (n_noised / b)

  metrics["loss"] = loss
  return loss, metrics


def _rngs(rng):
  mask_rng, dropout_rng = jax.random.split(rng)
  return {"mask": mask_rng, "dropout": dropout_rng}
