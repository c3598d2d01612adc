"""Samples from the model: PNG grids, and FID / Inception Score against real data.

Unconditional samples for every model; for class-conditional models, samples with
classifier-free guidance at each of `guidance_scales` (1 = plain conditional, sampled
without the unconditional half; default (1,); an unconditional model given scales is a
config error). DDIM (eta) or DDPM with `sampling_timesteps` respaced steps, each batch one
compiled program; eta and the steps default to config.diffusion's.
FID/IS use a feature network (feature_nets.py); the reference statistics of the real
split are cached on disk (keyed as in fid_scorer.py, weights file included). Without the
network's weights file the eval draws only the grid's samples (common.build says so). The
real-vs-real floor (`floor_split` images against the reference) is logged beside them:
a model cannot be expected to beat it with this many samples.
PNG grids of the first `num_grid` samples (0: none), images/{eval name}_{uncond|cfgS}_{step}.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_vision import diffusion as diffusion_lib
from big_vision import objective
from big_vision import visualize
from big_vision.config_parsing import check_int
from big_vision.evaluators import common
from big_vision.evaluators import fid_scorer

SAMPLERS = ("ddim", "ddpm")


class Evaluator:
  """Yields fid{_net}, is{_net}, is{_net}_std (prefixed cfg{scale}/ when conditional)."""

  def __init__(self, context, num_samples=512, batch_size=128, sampler="ddim",
               sampling_timesteps=None, eta=None, guidance_scales=None, feature_net=None,
               reference_split="test", floor_split="train", max_reference=10_000,
               cache_dir=None, data=None, pp=None, num_grid=64, seed=0):
    if sampler not in SAMPLERS:
      raise ValueError(f"sampling: unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if context.model.noised_queries:
      raise ValueError("sampling: a DiffMAE model (decoder_queries='noised_patches') "
                       "generates masked patches given visible ones, not whole images from "
                       "noise; evaluate it with the inpainting eval")
    # Checked now: these failed only at the eval's first run (the final one loses FID).
    check_int("num_samples", num_samples, 2 if feature_net else 1,
              " (FID needs two samples for a covariance)" if feature_net else "")
    check_int("batch_size", batch_size, 1)
    check_int("num_grid", num_grid, 0, " (0: no grid)")
    cfg = context.config
    # eta, like the steps, defaults to the diffusion section's (as the benchmark samples).
    if eta is None:
      eta = cfg.diffusion.get("eta", 0.0)
    self.context, self.sampler, self.eta = context, sampler, float(eta)
    # The batch is generated split over every device (of every process): a multiple of them.
    self.num_samples, self.batch_size, self.num_grid, self.seed = (
        int(num_samples), common.device_multiple(context, batch_size), int(num_grid),
        int(seed))
    self.sampling_timesteps = int(sampling_timesteps or cfg.diffusion.sampling_timesteps)
    self.clip_x0 = bool(cfg.diffusion.get("clip_x0", True))
    self.num_classes = int(cfg.model.get("num_classes") or 0)
    if guidance_scales is not None and not self.num_classes:
      raise ValueError(f"guidance_scales={tuple(guidance_scales)} needs a class-conditional "
                       "model (use_labels=True, model.num_classes > 0); this one samples "
                       "unconditionally only")
    self.guidance_scales = (tuple((1.0,) if guidance_scales is None else guidance_scales)
                            if self.num_classes else ())
    real_batch = common.device_multiple(context, 500)
    self.scorer, self.unscored = fid_scorer.optional_scorer(
        context, feature_net, common.eval_input_config(context, data, pp, real_batch,
                                                       reference_split),
        max_reference, cache_dir)
    self.floor_cfg = common.eval_input_config(context, data, pp, real_batch,
                                              _first(floor_split, self.num_samples))
    self._floor = None
    model, diffusion = context.model, context.diffusion
    h, w = model.image_size
    shape = (self.batch_size, h, w, model.channels)
    sample = {"ddim": functools.partial(diffusion_lib.ddim_sample, eta=self.eta),
              "ddpm": diffusion_lib.ddpm_sample}[sampler]

    split = functools.partial(jax.lax.with_sharding_constraint,
                              shardings=context.data_sharding)

    def generate(params, rng, first_id, scale, conditional):
      # The starting noise and labels split over the devices: each computes its share.
      x_T = split(jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32))
      labels = None
      if self.num_classes:
        ids = first_id + jnp.arange(self.batch_size)
        labels = split(ids % self.num_classes if conditional
                       else jnp.full_like(ids, self.num_classes))
      return sample(objective.model_eps_fn(model, params), diffusion, shape, rng, x_T=x_T,
                    sampling_timesteps=self.sampling_timesteps, clip_x0=self.clip_x0,
                    labels=labels, guidance_scale=scale,
                    null_label=self.num_classes if self.num_classes else None)
    self._generate = jax.jit(generate, static_argnames=("scale", "conditional"),
                             out_shardings=context.data_sharding)

  def drop_scorer(self):
    """Without FID/IS (no feature network's weights): only the grid's samples. Returns
    whether anything is left to do."""
    self.scorer = None
    self.num_samples = min(self.num_samples, self.num_grid)
    return self.num_samples > 0

  def samples(self, params, scale=None, conditional=False):
    """num_samples images in [-1, 1]; labels cycle through the classes when conditional."""
    out = []
    tag = "uncond" if not conditional else "cond" if scale is None else f"cfg{scale:g}"
    if scale == 1:  # eps_uncond + 1 (eps_cond - eps_uncond): the conditional eps alone,
      scale = None  # without guidance's doubled [cond, null] batch at every step.
    progress = common.Progress(f"samples {tag}", self.num_samples)
    for i in range(-(-self.num_samples // self.batch_size)):
      rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), i)
      out.append(common.gather(self._generate(params, rng, i * self.batch_size,
                                              scale if conditional else None,
                                              conditional and bool(self.num_classes))))
      progress.update(min(self.batch_size, self.num_samples - i * self.batch_size))
    return np.clip(np.concatenate(out)[:self.num_samples], -1.0, 1.0)

  def _grid(self, images, step, tag):
    if not self.context.is_main or not self.num_grid:
      return
    n = min(self.num_grid, len(images))
    per_row = int(np.ceil(np.sqrt(n)))
    rows = [images[i:i + per_row] for i in range(0, n, per_row)]
    visualize.image_grid(rows, common.image_path(
        self.context, f"{self.context.name or 'samples'}_{tag}", step))

  def run(self, params, step):
    runs = [("uncond", None, False)]
    runs += [(f"cfg{s:g}", float(s), True) for s in self.guidance_scales]
    for tag, scale, conditional in runs:
      images = self.samples(params, scale, conditional)
      self._grid(images, step, tag)
      if self.scorer is not None:
        prefix = "" if tag == "uncond" else f"{tag}/"
        for k, v in self.scorer.scores(images).items():
          yield prefix + k, v
    if self.scorer is not None:  # The floor: as many real images, scored the same way.
      if self._floor is None:
        self._floor = self.scorer.scores(self.scorer.real_images(self.floor_cfg,
                                                                 self.num_samples))
      for k, v in self._floor.items():
        yield f"{k}_real_floor", v


def _first(split, n):
  """The first n examples of a split ("train" -> "train[:n]"); a split that is already a
  slice ("train[:1000]") stays as given, and real_images stops after n of it."""
  return split if "[" in split else f"{split}[:{n}]"
