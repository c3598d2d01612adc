"""Validation diffusion loss: the training objective on held-out images, overall and by t.

Every image is scored by both branches (clean: x0 on masked pixels; noised at a random t:
eps on visible and, unless noised_x0_loss=False, x0 on masked pixels; DiffMAE: x0 on the
masked pixels it denoises, given the clean visible ones), and `loss` weighs them by
no_noise_prob, the expectation of the training objective. By-t losses score the noised branch with t drawn
uniformly inside each range. Label-conditioned models (num_classes > 0) see each image's
true label, as in training (without its label dropout); `loss_uncond` is their `loss` with
the null label (classifier-free guidance's unconditional model), on the same masks, steps
and noise. Deterministic: masks, steps and noise come from a fixed key per batch, so two
evaluations of the same parameters agree exactly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_vision import input_pipeline
from big_vision import objective
from big_vision.evaluators import common


class Evaluator:
  """Yields loss (the UMD objective), loss_clean, loss_noised, loss_t{lo}-{hi} and, for
  label-conditioned models, loss_uncond."""

  def __init__(self, context, num_ranges=4, data=None, pp=None, batch_size=None,
               split=None, max_examples=2000):
    self.context = context
    self.input_cfg = common.eval_input_config(context, data, pp, batch_size, split)
    self.max_examples = max_examples
    model, diffusion, cfg = context.model, context.diffusion, context.config
    n = diffusion.num_timesteps
    edges = np.linspace(0, n, num_ranges + 1).astype(int)
    self.ranges = list(zip(edges[:-1], edges[1:]))

    def apply(params, images, t, labels, *, mask_ratio, noised=None, rngs=None):
      return model.apply({"params": params}, images, t, labels, mask_ratio=mask_ratio,
                         noised=noised, rngs=rngs)

    clean_loss = functools.partial(objective.clean_branch_loss, grid=model.grid,
                                   patch_size=model.patch_size,
                                   any_masked=cfg.mask_ratio_no_noise > 0)
    noised_loss = functools.partial(
        objective.noised_branch_loss, grid=model.grid, patch_size=model.patch_size,
        any_masked=cfg.mask_ratio > 0, x0_loss=cfg.get("noised_x0_loss", True),
        noised_queries=model.noised_queries)

    def per_image(loss_fn, out, *arrays):
      """The branch loss of every image on its own (padding is weighted out later)."""
      return jax.vmap(lambda o, *a: loss_fn(jax.tree_util.tree_map(lambda x: x[None], o),
                                            *[x[None] for x in a]))(out, *arrays)

    def noised(params, images, labels, key, lo, hi):
      k_t, k_eps, k_mask = jax.random.split(key, 3)
      t = jax.random.randint(k_t, images.shape[:1], lo, hi)
      noise = jax.random.normal(k_eps, images.shape)
      x, queries = objective.model_inputs(images, diffusion.q_sample(images, t, noise),
                                          model.noised_queries)
      out = apply(params, x, t + 1, labels, mask_ratio=cfg.mask_ratio,
                  rngs={"mask": k_mask, "dropout": k_mask}, **queries)
      return per_image(noised_loss, out, images, noise)

    def objective_terms(params, images, labels, keys):
      """Per-image loss_clean, loss_noised and `loss`, their no_noise_prob mixture."""
      p = cfg.no_noise_prob
      result, total = {}, 0.0
      if p > 0:
        out = apply(params, images, jnp.zeros(images.shape[:1], jnp.int32), labels,
                    mask_ratio=cfg.mask_ratio_no_noise,
                    rngs={"mask": keys[0], "dropout": keys[0]})
        result["loss_clean"] = per_image(clean_loss, out, images)
        total = total + p * result["loss_clean"]
      if p < 1:
        result["loss_noised"] = noised(params, images, labels, keys[1], 0, n)
        total = total + (1 - p) * result["loss_noised"]
      result["loss"] = total  # The objective's expectation over the batch split.
      return result

    def losses(params, images, labels, valid, key):
      keys = jax.random.split(key, len(self.ranges) + 2)
      result = objective_terms(params, images, labels, keys)
      if cfg.no_noise_prob < 1:
        for (lo, hi), k in zip(self.ranges, keys[2:]):
          result[f"loss_t{lo}-{hi}"] = noised(params, images, labels, k, lo, hi)
      if labels is not None:  # The same keys: differs from `loss` by the label alone.
        result["loss_uncond"] = objective_terms(params, images, None, keys)["loss"]
      return {k: jnp.sum(v * valid) for k, v in result.items()}
    self._losses = jax.jit(losses)

  def run(self, params, step):
    del step
    totals, count = {}, 0.0
    for i, batch in enumerate(common.iterate(self.context, self.input_cfg, self.max_examples)):
      valid = batch[input_pipeline.MASK_KEY].astype(jnp.float32)
      labels = None  # Unconditional models: the null class, as in training.
      if self.context.model.num_classes:
        if "label" not in batch:
          raise ValueError(f"diffusion_loss: the model is label-conditioned (num_classes="
                           f"{self.context.model.num_classes}) but the eval batches have no "
                           f"'label'; keep it in the eval pp, e.g. keep('image', 'label')")
        labels = batch["label"]
      sums = self._losses(params, batch["image"], labels, valid, jax.random.PRNGKey(i))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      count += float(common.gather(valid).sum())
    for k, v in totals.items():
      yield k, v / count
