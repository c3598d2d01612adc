"""The UMD training objective, of which MAE, DiT, MaskDiT, MaskDM and DiffMAE are presets
(methods.py).

Each batch is split (statically, so shapes are known to jit):
  - the first round(B * no_noise_prob) images stay clean (t = 0), are masked with
    `mask_ratio_no_noise`, and are scored by the x0 error on masked pixels;
  - the rest are noised at t ~ U{0..T-1} (fed to the network as t + 1, keeping 0 for
    clean), masked with `mask_ratio`, and scored by the mean of the eps error on visible
    pixels and the x0 error on masked pixels (with `noised_x0_loss=False`, MaskDM's masked
    denoising, by the eps error on visible pixels alone);
  - with `noised_queries` (DiffMAE), the noised images are not the encoder's input: it sees
    the clean visible patches, the decoder the noised masked ones, and the branch is scored
    by the x0 error on masked pixels.
The total is the two branch losses weighted by their share of the batch. A branch with
no masked pixels scores what it can: x0 on all pixels (clean) or eps on all pixels (noised).

Every random draw of an example (mask, t, noise, label dropout) comes from that example's
own key, so the loss of a batch does not depend on how it is sharded or split into
micro-batches. Since every image of a branch has the same number of masked pixels, the
total is also the mean over examples of per-example losses.
"""
import jax
import jax.numpy as jnp

from big_vision.models import masking as masking_lib


def model_eps_fn(model, params):
  """The sampler's model_fn: eps at the ORIGINAL step t; the network is fed t + 1."""
  def fn(x, t, labels):
    return model.apply({"params": params}, x, t + 1, labels, mask_ratio=0.0)["eps"]
  return fn


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


def noised_branch_loss(out, images, noise, grid, patch_size, any_masked=True, x0_loss=True,
                       noised_queries=False):
  """Mean of eps error on visible pixels and x0 error on masked pixels; without x0_loss
  (MaskDM), the eps error on visible pixels alone; with noised_queries (DiffMAE), the x0
  error on the masked pixels it denoises."""
  if noised_queries:
    return clean_branch_loss(out, images, grid, patch_size)
  if not any_masked:
    return _masked_mse(out["eps"], noise, jnp.ones(images.shape[:-1] + (1,)))
  masked = masking_lib.mask_to_pixels(out["mask"], grid, patch_size)
  if not x0_loss:
    return _masked_mse(out["eps"], noise, 1.0 - masked)
  return 0.5 * (_masked_mse(out["eps"], noise, 1.0 - masked)
                + _masked_mse(out["x0"], images, masked))


def model_inputs(clean, noised, noised_queries):
  """(images, keyword arguments) for a model call on images noised at t: the noised
  images; for DiffMAE (noised_queries) the clean ones, its encoder's input, and the
  noised ones as its decoder's queries (noised=)."""
  return (clean, dict(noised=noised)) if noised_queries else (noised, {})


def drop_labels(labels, keys, rate, null_label):
  """Classifier-free guidance training: each label becomes the null class with `rate`."""
  if labels is None or not rate:
    return labels
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, rate))(keys)
  return jnp.where(drop, null_label, labels)


def umd_loss(apply_fn, params, images, labels, example_keys, diffusion, *, no_noise_prob,
             mask_ratio, mask_ratio_no_noise, grid, patch_size, mask_block_size=None,
             noised_x0_loss=True, noised_queries=False, label_dropout=0.0, null_label=None,
             one_call=True):
  """Returns (loss, metrics) for one batch.

  Args:
    apply_fn: (params, images, t, labels, masking=) -> model outputs (x0, eps, mask).
    params: the model parameters.
    images: [B, H, W, C] in [-1, 1].
    labels: [B] int labels or None.
    example_keys: [B] PRNG keys, one per example (masks, t, noise, label dropout).
    diffusion: a GaussianDiffusion (num_timesteps, q_sample).
    no_noise_prob, mask_ratio, mask_ratio_no_noise: the objective's knobs.
    grid, patch_size: the model's patch grid, to make masks and pixel masks.
    mask_block_size: block-wise masking (MaskDM) when set, else random masking.
    noised_x0_loss: the noised branch's x0 loss on masked pixels (False: MaskDM).
    noised_queries: DiffMAE's noised branch (apply_fn then takes noised=); no clean branch.
    label_dropout, null_label: classifier-free guidance training.
    one_call: both branches in one model call (the encoder runs per branch, the decoder
      once over the whole batch); False: a call per branch, the straightforward way,
      which computes the same (tests/test_objective.py) a little slower.
  """
  b = images.shape[0]
  n_clean, n_noised = split_sizes(b, no_noise_prob)
  if noised_queries and n_clean:  # Its queries would be the clean masked patches.
    raise ValueError(f"noised_queries (DiffMAE) has no clean branch: no_noise_prob="
                     f"{no_noise_prob} must be 0")
  keys = jax.vmap(lambda k: jax.random.split(k, 4))(example_keys)  # [B, 4]
  key_mask, key_t, key_eps, key_drop = (keys[:, i] for i in range(4))
  labels = drop_labels(labels, key_drop, label_dropout, null_label)
  masks = lambda sl, ratio: masking_lib.per_example(key_mask[sl], grid, ratio,
                                                    mask_block_size)
  # The model's inputs, branch by branch: clean images first, then noised ones.
  inputs, steps, maskings, noise, queries = [], [], [], None, {}
  if n_clean:
    inputs.append(images[:n_clean])
    steps.append(jnp.zeros((n_clean,), jnp.int32))
    maskings.append(masks(slice(0, n_clean), mask_ratio_no_noise))
  if n_noised:
    x0 = images[n_clean:]
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, diffusion.num_timesteps))(
        key_t[n_clean:])
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(key_eps[n_clean:])
    x, queries = model_inputs(x0, diffusion.q_sample(x0, t, noise), noised_queries)
    inputs.append(x)  # Only the noised branch has queries: DiffMAE has no clean one.
    steps.append(t + 1)
    maskings.append(masks(slice(n_clean, b), mask_ratio))
  cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)
  if one_call:
    out = apply_fn(params, cat(inputs), cat(steps), labels, masking=tuple(maskings),
                   **queries)
  else:
    outs, start = [], 0
    for x, t_in, m in zip(inputs, steps, maskings):
      y = None if labels is None else labels[start:start + x.shape[0]]
      outs.append(apply_fn(params, x, t_in, y, masking=m, **queries))
      start += x.shape[0]
    out = {k: cat([o[k] for o in outs]) for k in outs[0]}
  branch = lambda sl: {k: v[sl] for k, v in out.items()}
  metrics, loss = {}, 0.0
  if n_clean:
    clean = clean_branch_loss(branch(slice(0, n_clean)), images[:n_clean], grid, patch_size,
                              any_masked=mask_ratio_no_noise > 0)
    metrics["loss_clean"] = clean
    loss = loss + clean * (n_clean / b)
  if n_noised:
    noised_loss = noised_branch_loss(branch(slice(n_clean, b)), images[n_clean:], noise,
                                     grid, patch_size, any_masked=mask_ratio > 0,
                                     x0_loss=noised_x0_loss, noised_queries=noised_queries)
    metrics["loss_noised"] = noised_loss
    loss = loss + noised_loss * (n_noised / b)

  metrics["loss"] = loss
  return loss, metrics
