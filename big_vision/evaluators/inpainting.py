"""Inpainting, DiffMAE's use of a masked diffusion model: complete masked images by running
the reverse diffusion on the masked region while the visible region is re-noised from the
input at every step (so it always agrees with it), then pasted back at the end. A DiffMAE
model (decoder_queries="noised_patches") is asked as it was trained: its encoder sees the
clean visible patches, its decoder the masked ones at each step.

Compared with the one-step x0 prediction from the masked input (what MAE gives), for
models trained to predict masked pixels' x0 (not DiT or MaskDM, whose x0 head nothing
trains there), from the input the reconstruction eval gives them
(methods.reconstruction_t): clean images, MaskDiT's noised at t = 0 (it never sees clean
ones), DiffMAE's masked patches pure noise. Metrics: masked-region MSE and PSNR (images
in [-1, 1], PSNR = 10 log10(4 / MSE)) of both, and FID of the completed images when a
feature network is given. A PNG grid (images/{eval name}_{step}.png) shows masked input,
one-step x0 (where it has a meaning), diffusion inpainting and the original. The masks are
those the model was trained with: whole blocks for a model with masking="block", else
random patches.
"""
import jax
import jax.numpy as jnp
import numpy as np

from big_vision import diffusion as diffusion_lib
from big_vision import input_pipeline
from big_vision import methods
from big_vision import objective
from big_vision import reconstruct
from big_vision import visualize
from big_vision.evaluators import common
from big_vision.evaluators import fid_scorer
from big_vision.models import masking as masking_lib


def inpaint(model_fn, diffusion, images, pixel_mask, rng, *, sampling_timesteps, eta=1.0,
            clip_x0=True):
  """Fills pixel_mask == 1 of `images`; the rest is kept. Returns the completed images.

  model_fn(x_t, t_original, labels) -> eps, as for the samplers.
  """
  d = diffusion_lib.respace(diffusion, sampling_timesteps)
  rng_init, rng_steps = jax.random.split(rng)
  b = images.shape[0]

  def body(x, inputs):
    t, key = inputs
    key_known, key_step = jax.random.split(key)
    t_b = jnp.full((b,), t, jnp.int32)
    known = d.q_sample(images, t_b, jax.random.normal(key_known, images.shape))
    x = pixel_mask * x + (1.0 - pixel_mask) * known
    x, _ = diffusion_lib.ddim_step(model_fn, d, x, t_b, key_step, eta=eta, clip_x0=clip_x0)
    return x, None

  n = d.num_timesteps
  x = jax.random.normal(rng_init, images.shape)
  x, _ = jax.lax.scan(body, x, (jnp.arange(n - 1, -1, -1), jax.random.split(rng_steps, n)))
  return pixel_mask * x + (1.0 - pixel_mask) * images


ROW_NAMES = dict(masked="masked input", onestep="one-step x0", inpainted="diffusion inpainting")


class Evaluator:
  """Yields masked_mse, masked_psnr, onestep_masked_mse, onestep_masked_psnr (models that
  learn masked x0), fid{_net}."""

  def __init__(self, context, mask_ratio=0.5, sampling_timesteps=None, eta=1.0,
               max_examples=256, batch_size=None, split=None, data=None, pp=None,
               feature_net=None, reference_split="test", max_reference=10_000,
               cache_dir=None, num_images=8):
    masking_lib.check_mask_ratio(mask_ratio)
    if not mask_ratio:
      raise ValueError("inpainting needs mask_ratio > 0")
    model, diffusion = context.model, context.diffusion
    block_size = model.block_mask_size
    if block_size:  # Now, not at the first eval: the block size must divide the grid.
      masking_lib.masked_blocks(model.grid, mask_ratio, block_size)
    cfg = context.config
    self.context, self.max_examples, self.num_images = context, max_examples, num_images
    self.onestep = methods.learnt_mask_ratio(cfg) > 0
    diffmae = model.noised_queries
    # The default (64) rounded up to the devices, as sampling's; a batch_size given must
    # divide over them.
    self.input_cfg = common.eval_input_config(
        context, data, pp, batch_size or common.device_multiple(context, 64), split)
    # Reference statistics are cached and shared with the sampling eval.
    self.scorer, self.unscored = fid_scorer.optional_scorer(
        context, feature_net, common.eval_input_config(
            context, data, pp, common.device_multiple(context, 500), reference_split),
        max_reference, cache_dir)
    # eta stays 1 unless given, not config.diffusion.eta: re-noising the visible region at
    # every step needs stochastic steps to blend it with the generated one (as RePaint).
    steps = int(sampling_timesteps or cfg.diffusion.sampling_timesteps)
    clip = bool(cfg.diffusion.get("clip_x0", True))

    def apply_masked(params, images, t, labels, *, masking, noised=None, rngs=None):
      del rngs  # Nothing random: the masking is given.
      return model.apply({"params": params}, images, t, labels, masking=masking,
                         noised=noised)

    def run_batch(params, images, key):
      b = images.shape[0]
      key_mask, key_inpaint = jax.random.split(key)
      m = masking_lib.draw(key_mask, b, model.grid, mask_ratio, block_size)
      pixel_mask = masking_lib.mask_to_pixels(m.mask, model.grid, model.patch_size)
      def diffmae_eps(x, t, labels):  # Its decoder denoises the masked patches of x.
        x0 = model.apply({"params": params}, images, t + 1, labels, masking=m, noised=x)["x0"]
        return diffusion.predict_eps_from_x0(x, t, x0)
      model_fn = diffmae_eps if diffmae else objective.model_eps_fn(model, params)
      full = inpaint(model_fn, diffusion, images, pixel_mask, key_inpaint,
                     sampling_timesteps=steps, eta=eta, clip_x0=clip)
      denom = jnp.sum(pixel_mask, axis=(1, 2, 3)) * images.shape[-1]
      mse = lambda x: jnp.sum(jnp.square(x - images) * pixel_mask, axis=(1, 2, 3)) / denom
      out = dict(masked=jnp.where(pixel_mask > 0, 0.0, images), inpainted=full, mse=mse(full))
      if self.onestep:  # The reconstruction eval's one step, from the same masks.
        out["onestep"] = reconstruct.reconstruct(
            apply_masked, params, images, jax.random.fold_in(key_inpaint, 1),
            mask_ratio=mask_ratio, grid=model.grid, patch_size=model.patch_size,
            t=methods.reconstruction_t(cfg), diffusion=diffusion, noised_queries=diffmae,
            masking=m)["reconstruction"]
        out["onestep_mse"] = mse(out["onestep"])
      return out
    self._run_batch = jax.jit(run_batch)

  def drop_scorer(self):
    """Without FID (no feature network's weights): MSE, PSNR and the grid still."""
    self.scorer = None
    return True

  def run(self, params, step):
    parts = {"mse": [], "inpainted": []} | ({"onestep_mse": []} if self.onestep else {})
    rows = ["masked", "onestep", "inpainted"] if self.onestep else ["masked", "inpainted"]
    grid = None
    batches = common.iterate(self.context, self.input_cfg, self.max_examples,
                             what=f"inpainting {self.input_cfg['data']['split']}")
    for i, batch in enumerate(batches):
      out = self._run_batch(params, batch["image"], jax.random.PRNGKey(i))
      valid = common.gather(batch[input_pipeline.MASK_KEY]).astype(bool)
      for k in parts:
        parts[k].append(common.gather(out[k])[valid])
      if grid is None:
        n = self.num_images
        grid = [common.gather(x)[:n] for x in [out[r] for r in rows] + [batch["image"]]]
    parts = {k: np.concatenate(v) for k, v in parts.items()}
    if self.context.is_main and grid is not None:
      visualize.image_grid(grid, common.image_path(self.context,
                                               self.context.name or "inpainting", step),
                           row_names=[ROW_NAMES[r] for r in rows] + ["original"])
    for prefix, key in (("", "mse"), ("onestep_", "onestep_mse")):
      if key not in parts:
        continue
      yield f"{prefix}masked_mse", float(parts[key].mean())
      yield f"{prefix}masked_psnr", float(np.mean(10 * np.log10(4 / np.maximum(parts[key],
                                                                              1e-10))))
    if self.scorer is not None:
      for k, v in self.scorer.scores(parts["inpainted"]).items():
        if k.startswith("fid"):
          yield k, v
