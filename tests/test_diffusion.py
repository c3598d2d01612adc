"""Diffusion math: schedules vs closed forms, forward process, posterior, respacing, samplers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision import diffusion as D

T_VALUES = (1000, 37)


def _cos_f(u, s=0.008):
  return np.cos((u + s) / (1 + s) * np.pi / 2) ** 2


# Schedules.


@pytest.mark.parametrize("n", T_VALUES)
def test_linear_schedule_closed_form(n):
  b = D.get_betas("linear", n)
  assert b.dtype == np.float64 and b.shape == (n,)
  np.testing.assert_allclose([b[0], b[-1]], [1e-4 * 1000 / n, 0.02 * 1000 / n], rtol=1e-12)
  np.testing.assert_allclose(np.diff(b), (b[-1] - b[0]) / (n - 1), rtol=1e-9)


@pytest.mark.parametrize("n", T_VALUES)
def test_cosine_schedule_closed_form(n):
  d = D.GaussianDiffusion.create("cosine", n)
  # Index i is step i + 1: alphas_cumprod[i] = f((i + 1) / T) / f(0) until a beta is clipped.
  unclipped = np.cumprod(d.betas < 0.999).astype(bool)
  assert unclipped.sum() >= n - 1 and d.betas.max() <= 0.999
  want = _cos_f(np.arange(1, n + 1) / n) / _cos_f(0.0)
  np.testing.assert_allclose(d.alphas_cumprod[unclipped], want[unclipped], rtol=1e-10)


@pytest.mark.parametrize("n", T_VALUES)
def test_quadratic_schedule_closed_form(n):
  b = D.get_betas("quadratic", n)
  r = np.sqrt(b)
  np.testing.assert_allclose([r[0], r[-1]], np.sqrt([0.1 / n, 20.0 / n]), rtol=1e-12)
  np.testing.assert_allclose(np.diff(r), (r[-1] - r[0]) / (n - 1), rtol=1e-9)


@pytest.mark.parametrize("schedule", D.SCHEDULES)
@pytest.mark.parametrize("n", T_VALUES + (21,))
def test_schedules_are_valid(schedule, n):
  d = D.GaussianDiffusion.create(schedule, n)
  assert d.num_timesteps == n
  assert np.all((d.betas > 0) & (d.betas < 1))
  assert np.all(np.diff(d.alphas_cumprod) < 0)
  assert 0 < d.alphas_cumprod[-1] < d.alphas_cumprod[0] < 1
  np.testing.assert_array_equal(d.timestep_map, np.arange(n))


def test_cosine_single_step_is_valid():
  d = D.GaussianDiffusion.create("cosine", 1)
  assert d.num_timesteps == 1 and 0 < d.betas[0] < 1
  assert np.isfinite(d.posterior_log_variance_clipped).all()


@pytest.mark.parametrize("schedule,n,match", [
    ("sigmoid", 100, r"unknown beta schedule 'sigmoid'; allowed: cosine, linear, quadratic"),
    ("cosine", 0, r"num_timesteps=0 must be an int >= 1"),
    ("linear", -5, r"num_timesteps=-5 must be"),
    ("cosine", 2.5, r"num_timesteps=2.5 must be"),
    ("linear", 10, r"'linear' schedule with num_timesteps=10 has betas up to 2 >= 1"),
    ("quadratic", 20, r"'quadratic' schedule with num_timesteps=20"),
])
def test_bad_schedule_is_clear(schedule, n, match):
  with pytest.raises(ValueError, match=match):
    D.GaussianDiffusion.create(schedule, n)


@pytest.mark.parametrize("betas,match", [
    ([0.1, 1.0], r"betas\[1\]=1.0"), ([0.0, 0.1], r"betas\[0\]=0.0"),
    ([0.1, -0.2], r"betas\[1\]=-0.2"), ([[0.1]], r"1-D"), ([], r"non-empty"),
])
def test_from_betas_rejects_bad_betas(betas, match):
  with pytest.raises(ValueError, match=match):
    D.GaussianDiffusion.from_betas(betas)


def test_diffusion_is_frozen_and_jit_static():
  d = D.GaussianDiffusion.create("cosine", 10)
  with pytest.raises(AttributeError):
    d.betas = d.betas
  with pytest.raises(ValueError):
    d.alphas_cumprod[0] = 0.5
  f = jax.jit(lambda x, diff: diff.q_sample(x, jnp.array([3]), x), static_argnums=1)
  np.testing.assert_allclose(f(jnp.ones((1, 2)), d),
                             np.sqrt(d.alphas_cumprod[3]) + np.sqrt(1 - d.alphas_cumprod[3]),
                             rtol=1e-6)


# Forward process.

D1000 = D.GaussianDiffusion.create("cosine", 1000)
TS = np.array([0, 1, 10, 250, 500, 750, 990, 999])


def test_q_sample_formula_and_moments():
  d, n = D1000, 200_000
  x0 = jnp.asarray(np.linspace(-1, 1, len(TS)), jnp.float32)[:, None] * jnp.ones((1, n))
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  xt = np.asarray(d.q_sample(x0, jnp.asarray(TS), noise), np.float64)
  ab = d.alphas_cumprod[TS][:, None]
  np.testing.assert_allclose(
      xt, np.sqrt(ab) * np.asarray(x0) + np.sqrt(1 - ab) * np.asarray(noise), atol=1e-6)
  # Statistical: 5 standard errors of the mean and of the variance.
  mean, var = xt.mean(1), xt.var(1)
  want_mean, want_var = np.sqrt(ab[:, 0]) * np.asarray(x0[:, 0]), 1 - ab[:, 0]
  se_mean = np.sqrt(want_var / n)
  assert np.all(np.abs(mean - want_mean) < 5 * se_mean + 1e-7), (mean, want_mean)
  assert np.all(np.abs(var - want_var) < 5 * want_var * np.sqrt(2 / n) + 1e-7), (var, want_var)


def test_q_mean_variance():
  x0 = jnp.ones((len(TS), 3, 2)) * 0.7
  mean, var, log_var = D1000.q_mean_variance(x0, jnp.asarray(TS))
  ab = D1000.alphas_cumprod[TS][:, None, None]
  assert mean.shape == var.shape == log_var.shape == x0.shape
  np.testing.assert_allclose(mean, 0.7 * np.sqrt(ab) * np.ones(x0.shape), rtol=1e-6)
  np.testing.assert_allclose(var, (1 - ab) * np.ones(x0.shape), rtol=1e-6)
  np.testing.assert_allclose(log_var, np.log(1 - ab) * np.ones(x0.shape), rtol=1e-5)


def test_predict_x0_and_eps_are_inverses():
  d = D1000
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  xt = jax.random.normal(k1, (len(TS), 64))
  eps = jax.random.normal(k2, (len(TS), 64))
  t = jnp.asarray(TS)
  x0 = d.predict_x0_from_eps(xt, t, eps)
  np.testing.assert_allclose(d.predict_eps_from_x0(xt, t, x0), eps, rtol=1e-4, atol=1e-4)
  # x0 -> eps -> x0 loses float32 digits in proportion to 1/sqrt(ab) (~2e4 at t=999).
  back = d.predict_x0_from_eps(xt, t, d.predict_eps_from_x0(xt, t, x0))
  scale = d.sqrt_recip_alphas_cumprod[TS][:, None] * np.abs(np.asarray(xt)).max()
  assert np.all(np.abs(np.asarray(back) - np.asarray(x0)) <= 1e-6 * scale + 1e-6)


def test_q_sample_then_predict_x0_recovers_x0():
  d, t = D1000, jnp.asarray(TS[TS < 900])  # At ab ~ 1e-9 float32 cannot recover x0.
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  x0 = jax.random.uniform(k1, (len(TS[TS < 900]), 8, 8, 3), minval=-1, maxval=1)
  noise = jax.random.normal(k2, x0.shape)
  np.testing.assert_allclose(d.predict_x0_from_eps(d.q_sample(x0, t, noise), t, noise), x0,
                             atol=2e-3)
  # Where ab is not tiny, to float32 precision.
  np.testing.assert_allclose(d.predict_x0_from_eps(d.q_sample(x0[:4], t[:4], noise[:4]), t[:4],
                                                   noise[:4]), x0[:4], atol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_posterior_matches_gaussian_conditioning(schedule):
  d = D.GaussianDiffusion.create(schedule, 100)
  ts = np.array([0, 1, 5, 50, 99])
  x0 = np.linspace(-1, 1, 4)[None].repeat(len(ts), 0)
  xt = np.linspace(-2, 3, 4)[None].repeat(len(ts), 0)
  mean, var, log_var = d.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32),
                                                   jnp.asarray(xt, jnp.float32),
                                                   jnp.asarray(ts))
  for i, t in enumerate(ts):
    # Joint Gaussian of (x_{t-1}, x_t) given x0, written from betas alone, then conditioned.
    beta = d.betas[t]
    ab_prev = np.prod(1 - d.betas[:t])
    ab = ab_prev * (1 - beta)
    m_prev, v_prev = np.sqrt(ab_prev) * x0[i], 1 - ab_prev
    m_t, v_t = np.sqrt(1 - beta) * m_prev, (1 - beta) * v_prev + beta
    cov = np.sqrt(1 - beta) * v_prev
    np.testing.assert_allclose(v_t, 1 - ab, rtol=1e-12)
    np.testing.assert_allclose(mean[i], m_prev + cov / v_t * (xt[i] - m_t), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(var[i], v_prev - cov ** 2 / v_t, rtol=1e-5, atol=1e-12)
    if t > 0:
      np.testing.assert_allclose(log_var[i], np.log(v_prev - cov ** 2 / v_t), rtol=1e-5)
  np.testing.assert_allclose(mean[0], x0[0], atol=1e-6)  # Step 1 goes back to x0 exactly.


# Respacing.


def test_respace_to_all_steps_is_identity():
  r = D.respace(D1000, 1000)
  np.testing.assert_array_equal(r.timestep_map, np.arange(1000))
  for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
               "posterior_mean_coef1", "posterior_mean_coef2"):
    np.testing.assert_allclose(getattr(r, name), getattr(D1000, name), rtol=1e-9,
                               atol=1e-15, err_msg=name)


@pytest.mark.parametrize("k", [1, 2, 10, 50, 999])
def test_respace_keeps_alphas_cumprod(k):
  r = D.respace(D1000, k)
  assert r.num_timesteps == k and r.timestep_map.shape == (k,)
  assert np.all(np.diff(r.timestep_map) > 0)
  assert r.timestep_map[-1] == 999 and (k == 1 or r.timestep_map[0] == 0)
  if k > 1:  # Evenly spaced: gaps differ by at most one.
    gaps = np.diff(r.timestep_map)
    assert gaps.max() - gaps.min() <= 1
  np.testing.assert_allclose(r.alphas_cumprod, D1000.alphas_cumprod[r.timestep_map],
                             rtol=1e-12)


def test_respace_twice_maps_to_the_original():
  r = D.respace(D.respace(D1000, 100), 10)
  assert r.timestep_map.max() == 999
  np.testing.assert_allclose(r.alphas_cumprod, D1000.alphas_cumprod[r.timestep_map],
                             rtol=1e-12)


@pytest.mark.parametrize("k", [0, 1001, -1, 2.0])
def test_respace_rejects_bad_counts(k):
  with pytest.raises(ValueError, match=rf"sampling_timesteps={k!r} must be an int in \[1, 1000\]"):
    D.respace(D1000, k)


# Samplers.


def _toy_model(x, t, labels):
  del labels
  return 0.3 * x + jnp.sin(x) * (t[:, None] / 100.0)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
  d = D.GaussianDiffusion.create("cosine", 100)
  shape = (4, 5)
  x_T = jax.random.normal(jax.random.PRNGKey(0), shape)
  kw = dict(sampling_timesteps=20, x_T=x_T)
  a = D.ddim_sample(_toy_model, d, shape, jax.random.PRNGKey(1), **kw)
  b = D.ddim_sample(_toy_model, d, shape, jax.random.PRNGKey(2), **kw)
  np.testing.assert_array_equal(a, b)
  c = D.ddim_sample(_toy_model, d, shape, jax.random.PRNGKey(1), eta=1.0, **kw)
  e = D.ddim_sample(_toy_model, d, shape, jax.random.PRNGKey(2), eta=1.0, **kw)
  assert np.abs(np.asarray(c) - np.asarray(e)).max() > 1e-2
  # Without x_T, the rng draws it: same rng, same samples; another rng, other samples.
  f1 = D.ddim_sample(_toy_model, d, shape, jax.random.PRNGKey(3), sampling_timesteps=20)
  f2 = D.ddim_sample(_toy_model, d, shape, jax.random.PRNGKey(3), sampling_timesteps=20)
  f3 = D.ddim_sample(_toy_model, d, shape, jax.random.PRNGKey(4), sampling_timesteps=20)
  np.testing.assert_array_equal(f1, f2)
  assert np.abs(np.asarray(f1) - np.asarray(f3)).max() > 1e-2


@pytest.mark.parametrize("sampler", [D.ddim_sample, D.ddpm_sample])
def test_model_sees_original_timesteps_in_one_scan(sampler):
  d = D.GaussianDiffusion.create("linear", 100)
  seen, traces = [], []

  def model_fn(x, t, labels):
    traces.append(1)
    jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t)
    return 0.1 * x

  shape = (3, 2)
  fn = jax.jit(functools.partial(sampler, model_fn, d, shape, sampling_timesteps=7))
  out = fn(jax.random.PRNGKey(0))
  jax.block_until_ready(out)
  assert len(traces) == 1  # Traced once for all 7 steps: the loop is a scan.
  want = D.respace(d, 7).timestep_map[::-1]
  assert [int(s[0]) for s in seen] == list(want)
  assert all(s.shape == (3,) and s.dtype == np.int32 and len(set(s)) == 1 for s in seen)
  jaxpr = str(jax.make_jaxpr(functools.partial(sampler, model_fn, d, shape,
                                               sampling_timesteps=7))(jax.random.PRNGKey(0)))
  assert "scan" in jaxpr
  # jit and eager agree.
  np.testing.assert_allclose(out, sampler(model_fn, d, shape, jax.random.PRNGKey(0),
                                          sampling_timesteps=7), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", [D.ddim_sample, D.ddpm_sample])
def test_point_mass_data_is_recovered_exactly(sampler):
  # Data = the single point c: eps*(x_t, t) = (x_t - sqrt(ab) c) / sqrt(1 - ab).
  d = D.GaussianDiffusion.create("cosine", 200)
  c = jnp.array([0.25, -0.5, 0.9])
  ac = jnp.asarray(d.alphas_cumprod, jnp.float32)

  def model_fn(x, t, labels):
    ab = ac[t][:, None]
    return (x - jnp.sqrt(ab) * c) / jnp.sqrt(1 - ab)

  out = sampler(model_fn, d, (256, 3), jax.random.PRNGKey(0), sampling_timesteps=25,
                clip_x0=False)
  np.testing.assert_allclose(out, jnp.broadcast_to(c, out.shape), atol=1e-4)


MU = np.array([0.5, -0.3, 0.0])
SIGMA = np.array([0.5, 0.8, 1.0])
N_SAMPLES = 40_000


def _gaussian_model(alphas_cumprod):
  """Exact eps for data N(MU, SIGMA^2) per dim.

  x_t = a x0 + b eps with a = sqrt(ab), b = sqrt(1 - ab), so (eps, x_t) is jointly Gaussian
  with Cov(eps, x_t) = b and Var(x_t) = a^2 sigma^2 + b^2, hence
  E[eps | x_t] = b (x_t - a mu) / (a^2 sigma^2 + b^2).
  """
  ac = jnp.asarray(alphas_cumprod, jnp.float32)

  def model_fn(x, t, labels):
    ab = ac[t][:, None]
    return (x - jnp.sqrt(ab) * MU) * jnp.sqrt(1 - ab) / (ab * SIGMA ** 2 + 1 - ab)
  return model_fn


def _exact_moments(ac_kept, kind, eta=0.0):
  """Mean and variance the discrete sampler must produce with the exact model.

  Written from the papers with alphas_cumprod only: every step is affine in x plus
  independent Gaussian noise, so moments propagate exactly from N(0, 1).
  """
  m, v = np.zeros_like(MU), np.ones_like(MU)
  for i in reversed(range(len(ac_kept))):
    ab, ab_prev = ac_kept[i], (ac_kept[i - 1] if i else 1.0)
    a, b = np.sqrt(ab), np.sqrt(1 - ab)
    g = b / (ab * SIGMA ** 2 + 1 - ab)          # eps = g x - g a mu
    e_x, e_c = g, -g * a * MU
    x0_x, x0_c = (1 - b * e_x) / a, -b * e_c / a  # x0 = (x - b eps) / a
    if kind == "ddim":  # Song et al. eq. 12.
      s2 = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
      k = np.sqrt(1 - ab_prev - s2)
      lin, const = np.sqrt(ab_prev) * x0_x + k * e_x, np.sqrt(ab_prev) * x0_c + k * e_c
    else:  # Ho et al. eq. 7: posterior q(x_{t-1} | x_t, x0) at the predicted x0.
      beta = 1 - ab / ab_prev
      c1, c2 = np.sqrt(ab_prev) * beta / (1 - ab), np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
      lin, const = c1 * x0_x + c2, c1 * x0_c
      s2 = (1 - ab_prev) / (1 - ab) * beta if i else 0.0
    m, v = lin * m + const, lin ** 2 * v + s2
  return m, v


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("kind,steps,eta", [("ddim", 50, 0.0), ("ddim", 50, 0.5),
                                            ("ddim", 50, 1.0), ("ddpm", 50, None),
                                            ("ddpm", None, None)])
def test_exact_model_samples_the_data_distribution(schedule, kind, steps, eta):
  d = D.GaussianDiffusion.create(schedule, 200)
  model_fn = _gaussian_model(d.alphas_cumprod)
  kw = dict(sampling_timesteps=steps, clip_x0=False)
  if kind == "ddim":
    out = D.ddim_sample(model_fn, d, (N_SAMPLES, 3), jax.random.PRNGKey(0), eta=eta, **kw)
  else:
    out = D.ddpm_sample(model_fn, d, (N_SAMPLES, 3), jax.random.PRNGKey(0), **kw)
  out = np.asarray(out, np.float64)
  mean, std = out.mean(0), out.std(0)

  # Tight: the moments this discretization must give, within 5 standard errors.
  kept = d.alphas_cumprod if steps is None else D.respace(d, steps).alphas_cumprod
  m, v = _exact_moments(kept, kind, eta or 0.0)
  assert np.all(np.abs(mean - m) < 5 * np.sqrt(v / N_SAMPLES)), (mean, m)
  assert np.all(np.abs(std / np.sqrt(v) - 1) < 5 * np.sqrt(0.5 / N_SAMPLES)), (std, np.sqrt(v))
  # Loose: the data distribution, up to the discretization error of 50-200 steps.
  np.testing.assert_allclose(mean, MU, atol=0.03)
  # (Ancestral sampling with few steps underestimates the variance most: ~11% here.)
  np.testing.assert_allclose(std, SIGMA, rtol=0.08 if eta == 0.0 or steps is None else 0.15)


@pytest.mark.parametrize("wrong", ["schedule", "respaced_index"])
def test_exact_model_check_has_teeth(wrong):
  # A model for another schedule, or one fed respaced instead of original indices, must
  # fail the same tolerances.
  d = D.GaussianDiffusion.create("cosine", 200)
  if wrong == "schedule":
    ac = D.GaussianDiffusion.create("linear", 200).alphas_cumprod
  else:
    ac = np.resize(D.respace(d, 50).alphas_cumprod, 200)
  out = np.asarray(D.ddim_sample(_gaussian_model(ac), d, (N_SAMPLES, 3),
                                 jax.random.PRNGKey(0), sampling_timesteps=50, clip_x0=False))
  mean_ok = np.abs(out.mean(0) - MU) <= 0.03
  std_ok = np.abs(out.std(0) / SIGMA - 1) <= 0.08
  assert not np.all(mean_ok & std_ok)


@pytest.mark.parametrize("sampler", [D.ddim_sample, D.ddpm_sample])
def test_clip_x0_keeps_predictions_in_range(sampler):
  d = D.GaussianDiffusion.create("cosine", 100)
  model_fn = lambda x, t, labels: -x  # Predicts x0 far outside [-1, 1].
  out, x0s = sampler(model_fn, d, (8, 4), jax.random.PRNGKey(0), sampling_timesteps=10,
                     return_x0_trajectory=True)
  assert x0s.shape == (10, 8, 4)
  assert np.abs(np.asarray(x0s)).max() <= 1.0 and np.abs(np.asarray(out)).max() <= 1.0
  unclipped = sampler(model_fn, d, (8, 4), jax.random.PRNGKey(0), sampling_timesteps=10,
                      clip_x0=False)
  assert np.abs(np.asarray(unclipped)).max() > 1.0
  # DDIM's last step lands on its clipped x0 prediction.
  if sampler is D.ddim_sample:
    np.testing.assert_allclose(out, x0s[-1], atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_formula_with_clipping(eta):
  d = D.respace(D.GaussianDiffusion.create("cosine", 100), 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 6)) * 2
  t = jnp.array([9, 7, 4, 1, 0])
  rng = jax.random.PRNGKey(1)
  eps_model = lambda x, t, labels: -0.5 * x  # Puts x0 partly outside [-1, 1].
  out, x0 = D.ddim_step(eps_model, d, x, t, rng, eta=eta, clip_x0=True)
  xn, tn = np.asarray(x, np.float64), np.asarray(t)
  ab, ab_prev = d.alphas_cumprod[tn][:, None], d.alphas_cumprod_prev[tn][:, None]
  x0_want = np.clip((xn + 0.5 * np.sqrt(1 - ab) * xn) / np.sqrt(ab), -1, 1)
  assert np.abs(x0_want).max() == 1.0  # The clipping is exercised.
  eps = (xn - np.sqrt(ab) * x0_want) / np.sqrt(1 - ab)  # Recomputed from the clipped x0.
  sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
  noise = np.asarray(jax.random.normal(rng, x.shape), np.float64)
  want = np.sqrt(ab_prev) * x0_want + np.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * noise
  np.testing.assert_allclose(x0, x0_want, atol=1e-5)
  np.testing.assert_allclose(out, want, atol=1e-4)


def test_ddpm_step_matches_formula_with_clipping():
  d = D.respace(D.GaussianDiffusion.create("linear", 100), 10)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 6)) * 2
  t = jnp.array([9, 7, 4, 1, 0])
  rng = jax.random.PRNGKey(1)
  out, x0 = D.ddpm_step(lambda x, t, labels: -0.5 * x, d, x, t, rng, clip_x0=True)
  xn, tn = np.asarray(x, np.float64), np.asarray(t)
  ab, ab_prev = d.alphas_cumprod[tn][:, None], d.alphas_cumprod_prev[tn][:, None]
  beta = 1 - ab / ab_prev
  x0_want = np.clip((xn + 0.5 * np.sqrt(1 - ab) * xn) / np.sqrt(ab), -1, 1)
  mean = (np.sqrt(ab_prev) * beta * x0_want + np.sqrt(1 - beta) * (1 - ab_prev) * xn) / (1 - ab)
  std = np.sqrt((1 - ab_prev) / (1 - ab) * beta) * (tn[:, None] > 0)
  noise = np.asarray(jax.random.normal(rng, x.shape), np.float64)
  np.testing.assert_allclose(x0, x0_want, atol=1e-5)
  np.testing.assert_allclose(out, mean + std * noise, atol=1e-4)


# Classifier-free guidance.

NUM_CLASSES, NULL = 3, 3
EMB = jnp.asarray(np.random.RandomState(0).normal(size=(NUM_CLASSES + 1, 4)), jnp.float32)


def _label_model(batches):
  def model_fn(x, t, labels):
    batches.append(x.shape[0])
    return 0.2 * x + EMB[labels] * (1.0 + t[:, None] / 100.0)
  return model_fn


@pytest.mark.parametrize("sampler", [D.ddim_sample, D.ddpm_sample])
def test_classifier_free_guidance(sampler):
  d = D.GaussianDiffusion.create("cosine", 100)
  shape, labels = (6, 4), jnp.array([0, 1, 2, 0, 1, 2])
  kw = dict(sampling_timesteps=10, clip_x0=False)
  run = lambda model_fn, **k: sampler(model_fn, d, shape, jax.random.PRNGKey(0), **kw, **k)
  cond = run(_label_model([]), labels=labels)
  uncond = run(_label_model([]), labels=jnp.full_like(labels, NULL))
  batches = []
  g1 = run(_label_model(batches), labels=labels, guidance_scale=1.0, null_label=NULL)
  assert set(batches) == {12}  # One call on [x, x], not two.
  g0 = run(_label_model([]), labels=labels, guidance_scale=0.0, null_label=NULL)
  np.testing.assert_allclose(g1, cond, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g0, uncond, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(cond) - np.asarray(uncond)).max() > 1e-2

  # eps is linear in the label embedding, so scale s equals a model fed the extrapolated
  # embedding e_null + s (e_label - e_null).
  s = 2.5

  def extrapolated(x, t, lab):
    emb = EMB[NULL] + s * (EMB[lab] - EMB[NULL])
    return 0.2 * x + emb * (1.0 + t[:, None] / 100.0)

  np.testing.assert_allclose(
      run(_label_model([]), labels=labels, guidance_scale=s, null_label=NULL),
      run(extrapolated, labels=labels), rtol=1e-4, atol=1e-4)
  # The scale may be traced (one program for every scale).
  traced = jax.jit(lambda sc: run(_label_model([]), labels=labels, guidance_scale=sc,
                                  null_label=NULL))(jnp.float32(s))
  np.testing.assert_allclose(traced, run(extrapolated, labels=labels), rtol=1e-4, atol=1e-4)


# Bad sampler inputs.


@pytest.mark.parametrize("kw,match", [
    (dict(guidance_scale=2.0), r"guidance_scale=2.0 needs labels and null_label"),
    (dict(guidance_scale=2.0, labels=jnp.zeros((2,), jnp.int32)),
     r"guidance_scale=2.0 needs .*null_label=None"),
    (dict(eta=-0.5), r"eta=-0.5 must be >= 0"),
    (dict(x_T=jnp.zeros((3, 5))), r"x_T has shape \(3, 5\), want shape=\(2, 5\)"),
    (dict(labels=jnp.zeros((3,), jnp.int32)), r"labels have shape \(3,\), want \(2,\)"),
    (dict(sampling_timesteps=11), r"sampling_timesteps=11 must be an int in \[1, 10\]"),
])
def test_bad_sampler_inputs_are_clear(kw, match):
  d = D.GaussianDiffusion.create("cosine", 10)
  with pytest.raises(ValueError, match=match):
    D.ddim_sample(_toy_model, d, (2, 5), jax.random.PRNGKey(0), **kw)
  if "eta" not in kw:
    with pytest.raises(ValueError, match=match):
      D.ddpm_sample(_toy_model, d, (2, 5), jax.random.PRNGKey(0), **kw)
