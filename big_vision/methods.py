"""The methods as presets of one objective, and the checks every config must pass.

All methods train the same auto-encoder with the UMD split of each batch (see
docs in ../shared/notes/methods.md and README): a share `no_noise_prob` is clean and
masked with `mask_ratio_no_noise` (x0 loss on masked pixels); the rest is noised and
masked with `mask_ratio` (eps loss on visible, and unless `noised_x0_loss=False`, x0 loss
on masked pixels). DiffMAE's decoder queries (`decoder_queries="noised_patches"`) change
the noised branch: the encoder sees the clean visible patches, the decoder denoises the
masked ones (x0 loss on masked pixels). A method is nothing but defaults for these knobs
and the model's masking and queries; explicit options always win.
"""
import numpy as np

from big_vision import config_parsing

# Defaults per method. UMD's follow the official UMD config (no_noise_prob 0.5,
# mask ratios 0.375 noised / 0.75 clean); MAE is the clean branch alone without AdaLN;
# DiT is the noised branch without masking; MaskDiT the noised branch with masking.
# MaskDM (Lei et al., 2023) pre-trains with masked denoising alone: noised images, whole
# blocks of 4x4 patches masked (a grid the block size does not divide is a one-line
# error: set masking=random or another mask_block_size), the eps loss on visible patches
# and none on masked ones; it is then fine-tuned as a plain diffusion model (mask 0).
# DiffMAE (Wei et al., 2023): MAE's encoder on clean visible patches, a decoder with the
# time embedding that denoises the noised masked patches (joint self-attention over
# visible features and noised queries), x0 loss on masked pixels, 75% masked.
PRESETS = {
    "umd": dict(mask_ratio=0.375, mask_ratio_no_noise=0.75, no_noise_prob=0.5, adaln=True),
    "mae": dict(mask_ratio=0.75, mask_ratio_no_noise=0.75, no_noise_prob=1.0, adaln=False),
    "dit": dict(mask_ratio=0.0, mask_ratio_no_noise=0.75, no_noise_prob=0.0, adaln=True),
    "maskdit": dict(mask_ratio=0.5, mask_ratio_no_noise=0.75, no_noise_prob=0.0, adaln=True),
    "maskdm": dict(mask_ratio=0.75, mask_ratio_no_noise=0.75, no_noise_prob=0.0, adaln=True,
                   masking="block", mask_block_size=4, noised_x0_loss=False),
    "diffmae": dict(mask_ratio=0.75, mask_ratio_no_noise=0.75, no_noise_prob=0.0, adaln=False,
                    decoder_queries="noised_patches"),
}


def is_diffmae(config):
  """The decoder denoises noised masked patches given clean visible ones (DiffMAE)."""
  return config.model.get("decoder_queries", "mask_token") == "noised_patches"


def sees_clean_images(config):
  """Whether the encoder trains on clean images (UMD, MAE, DiffMAE), or only on noised
  ones (DiT, MaskDiT, MaskDM)."""
  return config.no_noise_prob > 0 or is_diffmae(config)


def reconstruction_t(config):
  """The diffusion step (0-based) a one-step reconstruction of masked images starts from:
  None (clean images) for models whose encoder trains on clean images, else 0, the
  lightest noise that they trained on (MaskDiT: clean images it never saw would score
  something it was not trained to do). DiffMAE's masked patches still start from pure
  noise (reconstruct.reconstruct)."""
  return None if sees_clean_images(config) else 0


def probe_features(config):
  """What the few-shot probe reads: the encoder's features of clean images, or of noised
  ones for models whose encoder never sees clean images (DiT, MaskDiT, MaskDM)."""
  return "representation" if sees_clean_images(config) else "noised"


def samples_from_noise(config):
  """Whether the model generates whole images from noise (FID/IS of samples): it must be
  trained on noised images, and DiffMAE generates masked patches only, given visible ones
  (its use is inpainting)."""
  return config.no_noise_prob < 1 and not is_diffmae(config)


def learnt_mask_ratio(config):
  """The mask ratio whose masked pixels the model learns to predict (x0): what
  reconstructions and one-step completions can show; 0 when it learns none (DiT, MaskDM)."""
  if config.no_noise_prob > 0:
    return config.mask_ratio_no_noise
  return config.mask_ratio if config.get("noised_x0_loss", True) else 0.0


def parse_method_arg(arg, method_defaults=None, **defaults):
  """Parses a config string whose defaults depend on its `method=` option.

  Args:
    arg: the config string, e.g. "method=mae,variant=B/4".
    method_defaults: optional {method: {option: value}} of config-specific extras
      (e.g. MAE's larger batch), applied on top of PRESETS.
    **defaults: the config's own options and defaults; must include `method`.
  Returns:
    ConfigDict of typed options: config defaults < method preset < explicit options.
  """
  method = config_parsing.peek(arg, "method", defaults.get("method", "umd"))
  if method not in PRESETS:
    raise config_parsing.ConfigError(
        f"unknown method {method!r}; known methods: {', '.join(sorted(PRESETS))}")
  merged = dict(defaults)
  merged.update(PRESETS[method])
  merged.update((method_defaults or {}).get(method, {}))
  return config_parsing.parse_arg(arg, **merged)


def check_diffusion(config):
  """The diffusion section and the sampling options of the evaluators that use it, by
  diffusion.py's own checks (their ValueErrors become one-line ConfigErrors)."""
  from big_vision import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top

  d = config.get("diffusion")
  if d is None:
    return
  schedule, steps = d.get("schedule", "cosine"), d.get("timesteps", 1000)
  try:
    diffusion_lib.get_betas(schedule, steps)  # Schedule name, T, and betas below 1.
  except ValueError as e:
    raise config_parsing.ConfigError(
        f"diffusion.schedule={schedule!r}, diffusion.timesteps={steps!r}: {e}") from None
  # Evaluators that sample take their own steps and eta (None: the diffusion section's).
  evals = {name: spec for name, spec in (config.get("evals") or {}).items()
           if spec.get("type") in ("sampling", "inpainting")}
  counts = [("diffusion.sampling_timesteps", d.get("sampling_timesteps"))] + [
      (f"evals.{name}.sampling_timesteps", spec.get("sampling_timesteps"))
      for name, spec in evals.items()]
  for name, value in counts:
    if value is not None:
      try:
        diffusion_lib.check_count(name, value, upper=steps)
      except ValueError as e:
        raise config_parsing.ConfigError(str(e)) from None
  eta_hint = " (0: deterministic DDIM, 1: DDPM-like)"
  _check_number("diffusion.eta", d.get("eta", 0.0), 0.0, hint=eta_hint, unset_ok=False)
  for name, spec in evals.items():  # None: the diffusion section's.
    _check_number(f"evals.{name}.eta", spec.get("eta"), 0.0, hint=eta_hint)


def _check_number(name, value, low, high=None, low_open=False, high_open=True, hint="",
                  unset_ok=True):
  """A finite number in [low, high) (or (low, ...] per the flags); None: unset, fine
  unless unset_ok is False."""
  if value is None and unset_ok:
    return
  ok = (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        and np.isfinite(value) and (value > low if low_open else value >= low)
        and (high is None or (value < high if high_open else value <= high)))
  if not ok:
    interval = ("(" if low_open else "[") + f"{low:g}, " + (
        "inf)" if high is None else f"{high:g}" + (")" if high_open else "]"))
    raise config_parsing.ConfigError(
        f"{name}={value!r} must be a finite number in {interval}{hint}")


def check_optimizer(config):
  """The optimizer, EMA and label-dropout values: out of range they train silently wrong
  (a negative clip flips the gradient, ema_decay 1 keeps the EMA at init, lr nan...)."""
  _check_number("lr", config.get("lr"), 0.0, low_open=True)
  _check_number("wd", config.get("wd"), 0.0)
  for beta in ("b1", "b2"):
    _check_number(f"optax.{beta}", (config.get("optax") or {}).get(beta), 0.0, 1.0)
  _check_number("grad_clip_norm", config.get("grad_clip_norm"), 0.0)
  _check_number("ema_decay", config.get("ema_decay"), 0.0, 1.0)
  _check_number("label_dropout", config.get("label_dropout"), 0.0, 1.0, high_open=False)


def check_config(config):
  """Raises ConfigError (one line) for values no run could use. Cheap: builds nothing."""
  from big_vision.models import ae  # pylint: disable=g-import-not-at-top

  for name in ("mask_ratio", "mask_ratio_no_noise", "no_noise_prob"):
    _check_number(name, config[name], 0.0, 1.0, high_open=name != "no_noise_prob",
                  unset_ok=False)
  # The mask ratios the run's branches use must each mask something on this patch grid.
  ratios = {}
  if config.no_noise_prob > 0:
    ratios["mask_ratio_no_noise"] = config.mask_ratio_no_noise
  if config.no_noise_prob < 1:
    ratios["mask_ratio"] = config.mask_ratio
  ae.check_model_config(config.model, **ratios)
  if is_diffmae(config) and (config.no_noise_prob > 0 or config.mask_ratio == 0
                             or not config.get("noised_x0_loss", True)):
    raise config_parsing.ConfigError(
        f"decoder_queries='noised_patches' (DiffMAE) denoises masked patches of noised "
        f"images, scored by their x0: it needs no_noise_prob=0 (got {config.no_noise_prob}),"
        f" mask_ratio > 0 (got {config.mask_ratio}) and noised_x0_loss=True (got "
        f"{config.get('noised_x0_loss', True)})")
  batch_size = config.get("batch_size")
  if batch_size is None and config.get("input") is not None:
    batch_size = config.input.get("batch_size")
  if batch_size is not None and batch_size <= 0:
    raise config_parsing.ConfigError(f"batch_size={batch_size} must be positive")
  # train_step.py divides the batch, its loss and gradients by grad_accum_steps.
  accum = config.get("grad_accum_steps", 1)
  config_parsing.check_int("grad_accum_steps", accum, 1)
  if batch_size is not None and batch_size % accum:
    raise config_parsing.ConfigError(
        f"batch_size={batch_size} is not divisible by grad_accum_steps={accum}")
  check_diffusion(config)
  check_optimizer(config)
