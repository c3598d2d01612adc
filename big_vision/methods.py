"""The methods as presets of one objective, and the checks every config must pass.

All methods train the same auto-encoder with the UMD split of each batch (see
docs in ../shared/notes/methods.md and README): a share `no_noise_prob` is clean and
masked with `mask_ratio_no_noise` (x0 loss on masked pixels); the rest is noised and
masked with `mask_ratio` (eps loss on visible, x0 loss on masked pixels). A method is
nothing but defaults for these knobs; explicit options always win.
"""
import numpy as np

from big_vision import config_parsing

# Defaults per method. UMD's follow the official UMD config (no_noise_prob 0.5,
# mask ratios 0.375 noised / 0.75 clean); MAE is the clean branch alone without AdaLN;
# DiT is the noised branch without masking; MaskDiT the noised branch with masking.
PRESETS = {
    "umd": dict(mask_ratio=0.375, mask_ratio_no_noise=0.75, no_noise_prob=0.5, adaln=True),
    "mae": dict(mask_ratio=0.75, mask_ratio_no_noise=0.75, no_noise_prob=1.0, adaln=False),
    "dit": dict(mask_ratio=0.0, mask_ratio_no_noise=0.75, no_noise_prob=0.0, adaln=True),
    "maskdit": dict(mask_ratio=0.5, mask_ratio_no_noise=0.75, no_noise_prob=0.0, adaln=True),
}


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


def _check_ratio(name, value, upper_inclusive=False):
  ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
  if not ok:
    allowed = "[0, 1]" if upper_inclusive else "[0, 1)"
    raise config_parsing.ConfigError(f"{name}={value} is outside {allowed}")


def _is_int(value):
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_count(name, value, upper=None):
  """An int >= 1 (not above `upper`): step counts and micro-batches."""
  if not (_is_int(value) and 1 <= value <= (upper if upper is not None else value)):
    allowed = "an int >= 1" if upper is None else f"an int in [1, {upper}]"
    raise config_parsing.ConfigError(f"{name}={value!r} must be {allowed}")


def _check_eta(name, value):
  if not (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
          and value >= 0):
    raise config_parsing.ConfigError(
        f"{name}={value!r} must be a number >= 0 (0: deterministic DDIM, 1: DDPM-like)")


def check_diffusion(config):
  """The diffusion section and the sampling options of the evaluators that use it."""
  from big_vision import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top

  d = config.get("diffusion")
  if d is None:
    return
  schedule = d.get("schedule", "cosine")
  if schedule not in diffusion_lib.SCHEDULES:
    raise config_parsing.ConfigError(
        f"unknown diffusion.schedule {schedule!r}; known: {', '.join(diffusion_lib.SCHEDULES)}")
  steps = d.get("timesteps", 1000)
  _check_count("diffusion.timesteps", steps)
  # Linear and quadratic betas end at 20 / T (diffusion.get_betas), which must stay < 1.
  if schedule in ("linear", "quadratic") and steps <= 20:
    raise config_parsing.ConfigError(
        f"diffusion.timesteps={steps} must be >= 21 for the {schedule!r} schedule "
        "(its last beta is 20 / timesteps); or use schedule 'cosine'")
  if d.get("sampling_timesteps") is not None:
    _check_count("diffusion.sampling_timesteps", d.sampling_timesteps, upper=steps)
  _check_eta("diffusion.eta", d.get("eta", 0.0))
  # Evaluators that sample take their own steps and eta (None: the diffusion section's).
  for name, spec in (config.get("evals") or {}).items():
    if spec.get("type") not in ("sampling", "inpainting"):
      continue
    if spec.get("sampling_timesteps") is not None:
      _check_count(f"evals.{name}.sampling_timesteps", spec["sampling_timesteps"],
                   upper=steps)
    if spec.get("eta") is not None:
      _check_eta(f"evals.{name}.eta", spec["eta"])


def check_config(config):
  """Raises ConfigError (one line) for values no run could use. Cheap: builds nothing."""
  from big_vision.models import ae  # pylint: disable=g-import-not-at-top

  _check_ratio("mask_ratio", config.mask_ratio)
  _check_ratio("mask_ratio_no_noise", config.mask_ratio_no_noise)
  _check_ratio("no_noise_prob", config.no_noise_prob, upper_inclusive=True)
  ae.check_model_config(config.model)
  batch_size = config.get("batch_size")
  if batch_size is None and config.get("input") is not None:
    batch_size = config.input.get("batch_size")
  if batch_size is not None and batch_size <= 0:
    raise config_parsing.ConfigError(f"batch_size={batch_size} must be positive")
  # train_step.py divides the batch, its loss and gradients by grad_accum_steps.
  accum = config.get("grad_accum_steps", 1)
  _check_count("grad_accum_steps", accum)
  if batch_size is not None and batch_size % accum:
    raise config_parsing.ConfigError(
        f"batch_size={batch_size} is not divisible by grad_accum_steps={accum}")
  check_diffusion(config)
