"""Gaussian diffusion math: schedules, q_sample, posterior, conversions, samplers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision import diffusion as dl


@pytest.mark.parametrize("T", [1000, 37])
def test_linear_schedule(T):
  b = dl.get_betas("linear", T)
  scale = 1000 / T
  assert b[0] == pytest.approx(1e-4 * scale) and b[-1] == pytest.approx(0.02 * scale)
  np.testing.assert_allclose(np.diff(b), np.diff(b)[0], rtol=1e-9)


@pytest.mark.parametrize("T", [1000, 37])
def test_cosine_schedule_closed_form(T):
  d = dl.GaussianDiffusion.create("cosine", T)
  s = 0.008
  f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
  expected = f(np.arange(1, T + 1)) / f(0)
  unclipped = np.asarray(d.betas) < 0.999
  np.testing.assert_allclose(np.asarray(d.alphas_cumprod)[unclipped][:-1],
                             expected[unclipped][:-1], rtol=1e-6)


def test_quadratic_schedule_and_invariants():
  b = dl.get_betas("quadratic", 1000)
  np.testing.assert_allclose(np.diff(np.sqrt(b)), np.diff(np.sqrt(b))[0], rtol=1e-7)
  for name in ("linear", "cosine", "quadratic"):
    d = dl.GaussianDiffusion.create(name, 200)
    ac = np.asarray(d.alphas_cumprod)
    assert np.all((np.asarray(d.betas) > 0) & (np.asarray(d.betas) < 1))
    assert np.all(np.diff(ac) < 0)


@pytest.mark.parametrize("bad", [("sigmoid", 10), ("linear", 0)])
def test_bad_schedule_is_clear(bad):
  with pytest.raises(ValueError, match=str(bad[0]) if bad[1] else "0"):
    dl.get_betas(*bad)


def test_q_sample_moments():
  d = dl.GaussianDiffusion.create("cosine", 1000)
  x0 = jnp.full((200_000, 1), 0.7)
  for t in (0, 300, 999):
    ab = float(d.alphas_cumprod[t])
    xt = d.q_sample(x0, jnp.full((200_000,), t), jax.random.normal(jax.random.PRNGKey(t),
                                                                   x0.shape))
    assert float(xt.mean()) == pytest.approx(np.sqrt(ab) * 0.7, abs=0.01)
    assert float(xt.var()) == pytest.approx(1 - ab, rel=0.02, abs=1e-4)


def test_x0_eps_conversions_are_inverse():
  d = dl.GaussianDiffusion.create("linear", 100)
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(key1, (5, 4, 4, 1))
  eps = jax.random.normal(key2, x0.shape)
  t = jnp.array([0, 10, 50, 90, 99])
  xt = d.q_sample(x0, t, eps)
  np.testing.assert_allclose(d.predict_x0_from_eps(xt, t, eps), x0, atol=2e-4)
  np.testing.assert_allclose(d.predict_eps_from_x0(xt, t, x0), eps, atol=2e-4)


def test_posterior_matches_closed_form():
  d = dl.GaussianDiffusion.create("cosine", 50)
  b, ab = np.asarray(d.betas, np.float64), np.asarray(d.alphas_cumprod, np.float64)
  x0, xt = jnp.full((1, 2), 0.3), jnp.full((1, 2), -0.5)
  for t in (1, 20, 49):
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, jnp.array([t]))
    c1 = b[t] * np.sqrt(ab[t - 1]) / (1 - ab[t])
    c2 = (1 - ab[t - 1]) * np.sqrt(1 - b[t]) / (1 - ab[t])
    assert float(mean[0, 0]) == pytest.approx(c1 * 0.3 + c2 * -0.5, rel=1e-5)
    assert float(var[0, 0]) == pytest.approx(b[t] * (1 - ab[t - 1]) / (1 - ab[t]), rel=1e-5)


def test_respacing():
  d = dl.GaussianDiffusion.create("cosine", 100)
  same = dl.respace(d, 100)
  np.testing.assert_allclose(same.alphas_cumprod, d.alphas_cumprod, rtol=1e-10)
  r = dl.respace(d, 10)
  assert r.num_timesteps == 10
  np.testing.assert_allclose(r.alphas_cumprod,
                             np.asarray(d.alphas_cumprod)[np.asarray(r.timestep_map)],
                             rtol=1e-10)
  with pytest.raises(ValueError, match="101"):
    dl.respace(d, 101)


def _gaussian_eps_fn(d, mu, sigma):
  """The exact eps predictor when the data is N(mu, sigma^2) per dimension."""
  def fn(x, t, labels):
    del labels
    ab = jnp.asarray(d.alphas_cumprod, jnp.float32)[t].reshape(-1, *([1] * (x.ndim - 1)))
    # E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab sigma^2 + 1 - ab).
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * sigma ** 2 + 1 - ab)
  return fn


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_exact_model_samples_the_data_distribution(sampler):
  d = dl.GaussianDiffusion.create("linear", 1000)
  mu, sigma = 0.5, 0.3
  fn = {"ddim": dl.ddim_sample, "ddpm": dl.ddpm_sample}[sampler]
  # All 1000 steps: with few steps both samplers shrink the variance (discretisation).
  x = jax.jit(functools.partial(fn, _gaussian_eps_fn(d, mu, sigma), d, (4000, 2),
                                clip_x0=False))(jax.random.PRNGKey(0))
  assert float(x.mean()) == pytest.approx(mu, abs=0.02)
  assert float(x.std()) == pytest.approx(sigma, rel=0.04)
  few = fn(_gaussian_eps_fn(d, mu, sigma), d, (4000, 2), jax.random.PRNGKey(0),
           sampling_timesteps=50, clip_x0=False)
  assert float(few.mean()) == pytest.approx(mu, abs=0.02)
  # A wrong model (wrong mean) lands elsewhere: the test can fail.
  y = fn(_gaussian_eps_fn(d, -mu, sigma), d, (4000, 2), jax.random.PRNGKey(0),
         sampling_timesteps=50, clip_x0=False)
  assert abs(float(y.mean()) - mu) > 0.5


def test_ddim_eta0_is_deterministic():
  d = dl.GaussianDiffusion.create("cosine", 100)
  fn = _gaussian_eps_fn(d, 0.0, 0.5)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  a = dl.ddim_sample(fn, d, (8, 3), jax.random.PRNGKey(1), sampling_timesteps=20, x_T=x_T)
  b = dl.ddim_sample(fn, d, (8, 3), jax.random.PRNGKey(2), sampling_timesteps=20, x_T=x_T)
  np.testing.assert_array_equal(a, b)
  c = dl.ddim_sample(fn, d, (8, 3), jax.random.PRNGKey(2), sampling_timesteps=20, x_T=x_T,
                     eta=1.0)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_classifier_free_guidance_endpoints():
  d = dl.GaussianDiffusion.create("cosine", 50)
  fn = lambda x, t, labels: 0.1 * x + 0.05 * labels[:, None].astype(jnp.float32)
  kw = dict(sampling_timesteps=10, x_T=jnp.ones((4, 2)), labels=jnp.array([1, 2, 3, 4]))
  cond = dl.ddim_sample(fn, d, (4, 2), jax.random.PRNGKey(0), **kw)
  uncond = dl.ddim_sample(fn, d, (4, 2), jax.random.PRNGKey(0),
                          **dict(kw, labels=jnp.full(4, 9)))
  g1 = dl.ddim_sample(fn, d, (4, 2), jax.random.PRNGKey(0), guidance_scale=1.0,
                      null_label=9, **kw)
  g0 = dl.ddim_sample(fn, d, (4, 2), jax.random.PRNGKey(0), guidance_scale=0.0,
                      null_label=9, **kw)
  np.testing.assert_allclose(g1, cond, atol=1e-5)
  np.testing.assert_allclose(g0, uncond, atol=1e-5)
