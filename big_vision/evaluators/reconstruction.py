"""Masked reconstruction of clean validation images: MSE and PSNR on masked pixels, and a
PNG grid (original, masked input, reconstruction): images/val_{eval name}_{step}.png
("val_" apart from the trainer's images/reconstruction_{step}.png of training images), or
images/{name}_{step}.png when `name` is given.

Models that train on clean images (UMD, MAE) reconstruct them as they are; DiffMAE from
pure noise at the masked patches (reconstruct.reconstruct). Models whose encoder only
ever sees noised images (MaskDiT) get them noised at the lightest step, t = 0 (0-based:
the model's t = 1), which they trained on: an input they never saw (t = 0, clean) would
score something they were not trained to do. `t` chooses another step.

PSNR is computed on images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE).
"""
import jax
import jax.numpy as jnp

from big_vision import config_parsing
from big_vision import input_pipeline
from big_vision import methods
from big_vision import reconstruct
from big_vision import visualize
from big_vision.evaluators import common
from big_vision.models import masking as masking_lib


class Evaluator:
  """Yields masked_mse, masked_psnr (and writes its PNG grid)."""

  def __init__(self, context, mask_ratio=None, data=None, pp=None, batch_size=None,
               split=None, max_examples=2000, num_images=8, name=None, t="auto"):
    cfg = context.config
    if mask_ratio is None:  # The masking the model was trained to fill in.
      mask_ratio = methods.learnt_mask_ratio(cfg)
    if not mask_ratio:
      raise ValueError("reconstruction needs mask_ratio > 0 (the config's model learns to "
                       "fill in no masked pixels: it masks nothing, or scores none)")
    masking_lib.check_mask_ratio(mask_ratio)  # Now, not at the first eval mid-training.
    if t == "auto":  # See the module docstring.
      t = methods.reconstruction_t(cfg)
    steps = context.diffusion.num_timesteps
    if t is not None and not (config_parsing.is_int(t) and 0 <= t < steps):
      raise ValueError(f"reconstruction t={t!r} must be 'auto', None (clean images) or an "
                       f"int in [0, {steps}) (a 0-based diffusion step)")
    self.t = t
    self.context, self.mask_ratio, self.name = context, float(mask_ratio), name
    if name is None:
      self.name = "val_" + (context.name or "reconstruction")
    self.input_cfg = common.eval_input_config(context, data, pp, batch_size, split)
    self.max_examples, self.num_images = max_examples, num_images
    model = context.model

    def apply(params, images, t, labels, *, mask_ratio, noised=None, rngs=None):
      return model.apply({"params": params}, images, t, labels, mask_ratio=mask_ratio,
                         noised=noised, rngs=rngs)

    def recon(params, images, valid, key):
      # DiffMAE's masked patches start from pure noise: its one-step reconstruction.
      r = reconstruct.reconstruct(apply, params, images, key, mask_ratio=self.mask_ratio,
                                  grid=model.grid, patch_size=model.patch_size, t=self.t,
                                  diffusion=context.diffusion,
                                  noised_queries=model.noised_queries)
      err = jnp.sum(jnp.square(r["prediction"] - images) * r["mask"], axis=(1, 2, 3))
      per_image = err / (jnp.sum(r["mask"], axis=(1, 2, 3)) * images.shape[-1])
      return r, jnp.sum(per_image * valid), jnp.sum(
          10.0 * jnp.log10(4.0 / jnp.maximum(per_image, 1e-10)) * valid)
    self._recon = jax.jit(recon)

  def run(self, params, step):
    mse = psnr = count = 0.0
    first = None
    for i, batch in enumerate(common.iterate(self.context, self.input_cfg, self.max_examples)):
      valid = batch[input_pipeline.MASK_KEY].astype(jnp.float32)
      r, m, p = self._recon(params, batch["image"], valid, jax.random.PRNGKey(i))
      mse, psnr = mse + float(m), psnr + float(p)
      count += float(common.gather(valid).sum())
      if first is None:
        n = self.num_images
        first = [common.gather(x)[:n] for x in (batch["image"], r["input"],
                                                 r["reconstruction"])]
    if self.context.is_main and first is not None:
      visualize.image_grid(
          first, common.image_path(self.context, self.name, step),
          row_names=["original", f"input{'' if self.t is None else f' noised t={self.t}'}, "
                     f"{self.mask_ratio:.0%} masked", "reconstruction"])
    yield "masked_mse", mse / count
    yield "masked_psnr", psnr / count
