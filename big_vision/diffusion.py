"""Gaussian diffusion: noise schedules, the forward process, and DDIM/DDPM samplers.

Knows nothing about the network. Conventions (as in improved-diffusion / DiT):
  * Steps are 0-based: index t in [0, T) is diffusion step t + 1, so
    x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) eps.
  * Tables are float64 numpy; methods gather them at t (int [B], or a scalar), cast to
    float32 and broadcast over the remaining dims of x.
  * A sampler's `model_fn(x_t, t_original, labels) -> eps` is called with the ORIGINAL
    step index t_original in [0, T) (int32 [B]), also when sampling with fewer, respaced
    steps. The network of this project keeps t = 0 for clean inputs and wants t + 1;
    that offset is the caller's business (wrap the network in model_fn), not this module's.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_vision import config_parsing

SCHEDULES = ("cosine", "linear", "quadratic")


def check_count(name, value, upper=None):
  """Positive int (numpy ints too; no bools or floats) not above `upper`."""
  ok = config_parsing.is_int(value) and value >= 1
  if ok and upper is not None:
    ok = value <= upper
  if not ok:
    allowed = "an int >= 1" if upper is None else f"an int in [1, {upper}]"
    shown = repr(value) if isinstance(value, str) else value  # np.int64(3) reads as 3.
    raise ValueError(f"{name}={shown} must be {allowed}")
  return int(value)


def get_betas(schedule, num_timesteps):
  """float64 [T] betas of a named schedule; linear/quadratic scale with 1000/T."""
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown beta schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
  n = check_count("num_timesteps", num_timesteps)
  # DDPM's endpoints are for T=1000; improved-diffusion scales them so any T works.
  scale = 1000.0 / n
  lo, hi = scale * 1e-4, scale * 0.02
  if schedule == "linear":
    betas = np.linspace(lo, hi, n, dtype=np.float64)
  elif schedule == "quadratic":
    betas = np.linspace(np.sqrt(lo), np.sqrt(hi), n, dtype=np.float64) ** 2
  else:  # cosine, Nichol & Dhariwal (2021) eq. 17 with s = 0.008.
    s = 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    u = np.arange(n + 1, dtype=np.float64) / n
    # Clipped: near u = 1 the ratio goes to 0, which would make beta_T = 1.
    betas = np.minimum(1.0 - f(u[1:]) / f(u[:-1]), 0.999)
  if betas.max() >= 1.0:
    # Only linear/quadratic with T <= 20 get here: their last beta is 20 / T.
    raise ValueError(f"{schedule!r} schedule with num_timesteps={n} has betas up to "
                     f"{betas.max():.3g} >= 1; use num_timesteps >= 21 or 'cosine'")
  return betas


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hash by identity (jit-static).
class GaussianDiffusion:
  """Precomputed float64 tables of a diffusion; build with `create` or `from_betas`."""
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  timestep_map: np.ndarray  # int64 [T]: original step index of each step.

  def __post_init__(self):
    for f in dataclasses.fields(self):
      getattr(self, f.name).setflags(write=False)  # Frozen means the tables too.

  @classmethod
  def create(cls, schedule="cosine", num_timesteps=1000):
    return cls.from_betas(get_betas(schedule, num_timesteps))

  @classmethod
  def from_betas(cls, betas, timestep_map=None):
    """Tables from float [T] betas in (0, 1); timestep_map defaults to arange(T)."""
    betas = np.array(betas, dtype=np.float64)
    if betas.ndim != 1 or not betas.size:
      raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    bad = np.flatnonzero(~((betas > 0) & (betas < 1)))
    if bad.size:
      raise ValueError(f"betas must lie in (0, 1); betas[{bad[0]}]={float(betas[bad[0]])}")
    return cls._from_tables(betas, np.cumprod(1.0 - betas), timestep_map)

  @classmethod
  def _from_tables(cls, betas, ac, timestep_map):
    """All tables from betas and their alphas_cumprod (passed in to keep respaced ones exact)."""
    n = betas.size
    if timestep_map is None:
      timestep_map = np.arange(n)
    timestep_map = np.array(timestep_map, dtype=np.int64)
    if timestep_map.shape != (n,):
      raise ValueError(f"timestep_map has shape {timestep_map.shape}, want ({n},)")
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # post_var[0] is 0; its log is clipped to the next value (as in improved-diffusion).
    # With a single step there is no next value; beta is the natural upper bound.
    post_log_var = np.log(np.append(post_var[1] if n > 1 else betas[0], post_var[1:]))
    return cls(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        timestep_map=timestep_map,
    )

  @property
  def num_timesteps(self):
    return int(self.betas.shape[0])

  # Forward process and its inverses. All take t of shape [B] (or scalar).
  def q_sample(self, x0, t, noise):
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
    return (_extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

  def q_mean_variance(self, x0, t):
    """(mean, variance, log_variance) of q(x_t | x0), each shaped like x0."""
    mean = _extract(self.sqrt_alphas_cumprod, t, x0) * x0
    var = jnp.broadcast_to(_extract(1.0 - self.alphas_cumprod, t, x0), mean.shape)
    log_var = jnp.broadcast_to(_extract(np.log1p(-self.alphas_cumprod), t, x0), mean.shape)
    return mean, var, log_var

  def q_posterior_mean_variance(self, x0, x_t, t):
    """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x0), shaped like x_t."""
    mean = (_extract(self.posterior_mean_coef1, t, x_t) * x0
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
    var = jnp.broadcast_to(_extract(self.posterior_variance, t, x_t), mean.shape)
    log_var = jnp.broadcast_to(_extract(self.posterior_log_variance_clipped, t, x_t),
                               mean.shape)
    return mean, var, log_var

  def predict_x0_from_eps(self, x_t, t, eps):
    return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

  def predict_eps_from_x0(self, x_t, t, x0):
    return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
            / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))


def _extract(table, t, x):
  """table[t] as float32, shaped to broadcast against x ([B] -> [B, 1, ..., 1])."""
  n = np.shape(table)[0]
  try:  # JAX would clamp (or wrap) a bad index silently; a traced t cannot be checked.
    tn = np.asarray(t)
  except (jax.errors.TracerArrayConversionError, RuntimeError):  # Or held by other hosts.
    tn = None
  if tn is not None and tn.size and (tn.min() < 0 or tn.max() >= n):
    bad = tn.min() if tn.min() < 0 else tn.max()
    raise ValueError(f"diffusion step t={bad} must lie in [0, {n}) (0-based: index t is "
                     f"step t + 1)")
  t = jnp.asarray(t)
  vals = jnp.asarray(np.asarray(table), jnp.float32)[t]
  return vals.reshape(t.shape + (1,) * (jnp.ndim(x) - t.ndim))


def respace(diffusion, sampling_timesteps):
  """The diffusion restricted to `sampling_timesteps` evenly spaced steps.

  Like improved-diffusion's SpacedDiffusion: keeps the last step (so sampling starts from
  pure noise) and, for k >= 2, the first; new betas make the kept alphas_cumprod exact;
  timestep_map composes, so it always points into the original, un-respaced diffusion.
  """
  n = diffusion.num_timesteps
  k = check_count("sampling_timesteps", sampling_timesteps, upper=n)
  # Counted down from the last step so that k = 1 keeps the last step, not the first.
  kept = np.round(np.linspace(n - 1, 0, k))[::-1].astype(np.int64)
  assert np.all(np.diff(kept) > 0), kept  # Spacing >= 1, so rounding keeps them distinct.
  ac = diffusion.alphas_cumprod[kept]
  betas = 1.0 - ac / np.append(1.0, ac[:-1])
  # Kept alphas_cumprod as they are: cumprod(1 - betas) would lose digits where ac ~ 1e-9.
  return GaussianDiffusion._from_tables(betas, ac.copy(), diffusion.timestep_map[kept])


# Sampling. `t` below indexes `diffusion` (possibly respaced); the model sees
# diffusion.timestep_map[t].


def model_eps(model_fn, diffusion, x, t, labels=None, guidance_scale=None, null_label=None):
  """eps from model_fn at step t, with classifier-free guidance if guidance_scale is set.

  Guidance evaluates model_fn once on [x, x] with [labels, null_label] and returns
  eps_uncond + guidance_scale * (eps_cond - eps_uncond).
  """
  t_orig = jnp.asarray(diffusion.timestep_map, jnp.int32)[t]
  t_orig = jnp.broadcast_to(t_orig, x.shape[:1])
  if guidance_scale is None:
    return model_fn(x, t_orig, labels)
  labels = jnp.asarray(labels)
  both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t_orig, t_orig]),
                  jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
  eps_cond, eps_uncond = jnp.split(both, 2)
  return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _x0_and_eps(model_fn, diffusion, x, t, clip_x0, guide):
  eps = model_eps(model_fn, diffusion, x, t, **guide)
  x0 = diffusion.predict_x0_from_eps(x, t, eps)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    # Keep eps consistent with the clipped x0, else DDIM's x_{t-1} leaves the data range.
    eps = diffusion.predict_eps_from_x0(x, t, x0)
  return x0, eps


def ddim_step(model_fn, diffusion, x, t, rng, *, eta=0.0, clip_x0=True, labels=None,
              guidance_scale=None, null_label=None):
  """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12). Returns (x_{t-1}, x0_pred)."""
  guide = dict(labels=labels, guidance_scale=guidance_scale, null_label=null_label)
  x0, eps = _x0_and_eps(model_fn, diffusion, x, t, clip_x0, guide)
  # sigma_t^2 = eta^2 (1-ab_prev)/(1-ab) (1 - ab/ab_prev), which is eta^2 times the
  # posterior variance; the float64 table avoids float32 cancellation in 1 - ab.
  var = eta ** 2 * _extract(diffusion.posterior_variance, t, x)
  dir_coef = jnp.sqrt(jnp.maximum(_extract(1.0 - diffusion.alphas_cumprod_prev, t, x) - var,
                                  0.0))
  mean = _extract(np.sqrt(diffusion.alphas_cumprod_prev), t, x) * x0 + dir_coef * eps
  noise = jax.random.normal(rng, x.shape, x.dtype)
  return mean + jnp.sqrt(var) * noise, x0


def ddpm_step(model_fn, diffusion, x, t, rng, *, clip_x0=True, labels=None,
              guidance_scale=None, null_label=None):
  """One ancestral step: posterior mean at the predicted x0, posterior variance.

  No noise at t = 0. Returns (x_{t-1}, x0_pred).
  """
  guide = dict(labels=labels, guidance_scale=guidance_scale, null_label=null_label)
  x0, _ = _x0_and_eps(model_fn, diffusion, x, t, clip_x0, guide)
  mean, _, log_var = diffusion.q_posterior_mean_variance(x0, x, t)
  nonzero = (jnp.asarray(t) != 0).astype(x.dtype)
  nonzero = nonzero.reshape(nonzero.shape + (1,) * (x.ndim - nonzero.ndim))
  noise = jax.random.normal(rng, x.shape, x.dtype)
  return mean + nonzero * jnp.exp(0.5 * log_var) * noise, x0


def _sample(step_fn, model_fn, diffusion, shape, rng, *, sampling_timesteps, x_T, labels,
            guidance_scale, null_label, return_x0_trajectory, **step_kw):
  shape = tuple(shape)
  if x_T is not None and tuple(x_T.shape) != shape:
    raise ValueError(f"x_T has shape {tuple(x_T.shape)}, want shape={shape}")
  if labels is not None and tuple(jnp.shape(labels)) != shape[:1]:
    raise ValueError(f"labels have shape {tuple(jnp.shape(labels))}, want {shape[:1]}")
  if guidance_scale is not None and (labels is None or null_label is None):
    raise ValueError(f"guidance_scale={guidance_scale!r} needs labels and null_label "
                     f"(got labels={'None' if labels is None else 'set'}, "
                     f"null_label={null_label!r})")
  if sampling_timesteps is not None:
    diffusion = respace(diffusion, sampling_timesteps)

  rng_init, rng_steps = jax.random.split(rng)
  if x_T is None:
    x_T = jax.random.normal(rng_init, shape, jnp.float32)
  n = diffusion.num_timesteps
  step = functools.partial(step_fn, model_fn, diffusion, labels=labels,
                           guidance_scale=guidance_scale, null_label=null_label, **step_kw)

  def body(x, inputs):
    t, step_rng = inputs
    x, x0 = step(x, jnp.full(shape[:1], t, jnp.int32), step_rng)
    return x, (x0 if return_x0_trajectory else None)

  # One scan over the steps: a single compiled program, no host round-trip per step.
  ts = jnp.arange(n - 1, -1, -1, dtype=jnp.int32)
  x, x0s = jax.lax.scan(body, jnp.asarray(x_T, jnp.float32),
                        (ts, jax.random.split(rng_steps, n)))
  return (x, x0s) if return_x0_trajectory else x


def ddim_sample(model_fn, diffusion, shape, rng, *, sampling_timesteps=None, eta=0.0,
                clip_x0=True, x_T=None, labels=None, guidance_scale=None, null_label=None,
                return_x0_trajectory=False):
  """DDIM samples (Song et al. 2021); eta = 0 is deterministic given x_T.

  Args:
    model_fn: (x_t [B, ...], t_original int32 [B], labels [B] or None) -> eps [B, ...].
      t_original indexes the ORIGINAL diffusion; any +1 offset the network wants is
      model_fn's business.
    diffusion: the GaussianDiffusion the model was trained with.
    shape: shape of the samples, [B, ...].
    rng: PRNG key for x_T (unless given) and the per-step noise.
    sampling_timesteps: number of evenly respaced steps; None uses every step.
    eta: noise scale of each step (0 = deterministic, 1 = DDPM-like variance).
    clip_x0: clip predicted x0 to [-1, 1] (pixel data).
    x_T: optional starting noise of `shape`.
    labels: optional int [B] class labels, passed to model_fn.
    guidance_scale: if not None, classifier-free guidance with this scale (1 = purely
      conditional, 0 = purely unconditional); needs labels and null_label.
    null_label: the label of the unconditional (null) class.
    return_x0_trajectory: also return the x0 predictions, [steps, B, ...], in sampling
      order (noisiest first).
  Returns:
    samples [B, ...] float32, or (samples, x0_trajectory).

  jit-compatible: model_fn, diffusion, shape, sampling_timesteps, clip_x0 and
  return_x0_trajectory are static (close over them, e.g. with functools.partial);
  rng, x_T, labels, eta and guidance_scale may be traced.
  """
  if isinstance(eta, (int, float)) and eta < 0:
    raise ValueError(f"eta={eta!r} must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like)")
  return _sample(ddim_step, model_fn, diffusion, shape, rng,
                 sampling_timesteps=sampling_timesteps, x_T=x_T, labels=labels,
                 guidance_scale=guidance_scale, null_label=null_label,
                 return_x0_trajectory=return_x0_trajectory, eta=eta, clip_x0=clip_x0)


def ddpm_sample(model_fn, diffusion, shape, rng, *, sampling_timesteps=None, clip_x0=True,
                x_T=None, labels=None, guidance_scale=None, null_label=None,
                return_x0_trajectory=False):
  """Ancestral DDPM samples with the posterior variance; no noise at the last step.

  Arguments and return as ddim_sample, without eta.
  """
  return _sample(ddpm_step, model_fn, diffusion, shape, rng,
                 sampling_timesteps=sampling_timesteps, x_T=x_T, labels=labels,
                 guidance_scale=guidance_scale, null_label=null_label,
                 return_x0_trajectory=return_x0_trajectory, clip_x0=clip_x0)
