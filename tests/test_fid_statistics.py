"""FID and IS against closed forms; the statistics cache; the feature-net metric names."""
import os

import numpy as np
import pytest

from big_vision.evaluators import fid_math


def test_identical_statistics_give_zero():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 16))
  mu, sigma = fid_math.feature_statistics(x)
  assert abs(fid_math.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_diagonal_gaussians_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
  a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid_math.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-10)


def test_non_commuting_covariances_against_eigendecomposition():
  rng = np.random.default_rng(1)
  m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
  s1, s2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)
  # Tr((s1 s2)^(1/2)) = sum of square roots of the eigenvalues of s1 s2 (all real >= 0).
  tr = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
  expected = np.trace(s1) + np.trace(s2) - 2 * tr
  assert fid_math.frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(
      expected, rel=1e-8)


def test_sample_fid_approaches_closed_form():
  rng = np.random.default_rng(2)
  a = rng.normal(0.0, 1.0, size=(200_000, 2))
  b = rng.normal(0.5, 2.0, size=(200_000, 2))
  got = fid_math.frechet_distance(*fid_math.feature_statistics(a),
                                  *fid_math.feature_statistics(b))
  assert got == pytest.approx(2 * 0.25 + 2 * (1 - 2) ** 2, rel=0.02)


def test_streaming_accumulator_equals_direct():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1000, 8)) * 3 + 1
  acc = fid_math.StatisticsAccumulator()
  for part in np.array_split(x, 7):
    acc.update(part)
  mu, sigma = acc.result()
  mu_ref, sigma_ref = fid_math.feature_statistics(x)
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


def test_inception_score_closed_forms():
  k = 10
  assert fid_math.inception_score(np.full((1000, k), 1 / k))[0] == pytest.approx(1.0)
  confident = np.eye(k)[np.arange(1000) % k]  # Balanced and certain: IS = K.
  assert fid_math.inception_score(confident)[0] == pytest.approx(k, rel=1e-9)
  one_class = np.eye(k)[np.zeros(1000, int)]  # Certain but always the same class: 1.
  assert fid_math.inception_score(one_class)[0] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="summing to 1"):
    fid_math.inception_score(np.ones((10, 3)))


def test_mismatched_statistics_error():
  with pytest.raises(ValueError, match="mismatched statistics"):
    fid_math.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_reference_cache_computes_once_and_keys_by_fields(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return np.zeros(2), np.eye(2)

  key = dict(dataset="fashion_mnist_local", split="test", resolution="28x28",
             network="fmnist_classifier")
  for _ in range(2):
    mu, sigma = fid_math.cached_reference_stats(str(tmp_path), key, compute)
  assert len(calls) == 1 and np.array_equal(sigma, np.eye(2))
  fid_math.cached_reference_stats(str(tmp_path), dict(key, resolution="32x32"), compute)
  fid_math.cached_reference_stats(str(tmp_path), dict(key, network="inception"), compute)
  assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 3
  _, _, meta = fid_math.load_statistics(fid_math.cache_path(str(tmp_path), key))
  assert meta["network"] == "fmnist_classifier" and meta["split"] == "test"


def test_scorer_cache_key_follows_weights_file_and_pp(tmp_path):
  """A retrained feature net (or another eval pp) must not reuse stale statistics."""
  import types
  import jax
  import jax.numpy as jnp
  from big_vision.evaluators import fid_scorer
  from big_vision.models import fmnist_classifier

  weights = str(tmp_path / "fmnist_classifier.npz")

  def write_weights(seed):
    params = fmnist_classifier.Classifier().init(jax.random.PRNGKey(seed),
                                                 jnp.zeros((1, 28, 28, 1)))["params"]
    fmnist_classifier.save(params, weights, dict(note=f"random {seed}, for tests"))

  context = types.SimpleNamespace(model=types.SimpleNamespace(image_size=(28, 28), channels=1))
  images = np.random.default_rng(0).uniform(-1, 1, (40, 28, 28, 1)).astype(np.float32)
  computed = []

  def reference(pp="value_range(-1, 1)"):
    ref_cfg = dict(data=dict(name="fashion_mnist_local", split="test"), pp=pp)
    scorer = fid_scorer.Scorer(context, dict(kind="fmnist_classifier", weights=weights),
                               ref_cfg, max_reference=40, cache_dir=str(tmp_path / "cache"))
    scorer.real_images = lambda cfg, n: computed.append(1) or images
    return scorer.cache_key(), scorer.reference()

  write_weights(0)
  key_a, (mu_a, _) = reference()
  key_again, (mu_again, _) = reference()
  assert len(computed) == 1 and key_again == key_a and np.array_equal(mu_again, mu_a)
  write_weights(1)  # Same path, new weights: a new key, recomputed statistics.
  key_b, (mu_b, _) = reference()
  assert len(computed) == 2 and key_b["weights"] != key_a["weights"]
  assert not np.allclose(mu_b, mu_a)
  reference(pp="value_range(-1, 1)|keep('image')")
  assert len(computed) == 3


def test_save_npz_interrupted_leaves_the_old_file(tmp_path, monkeypatch):
  path = str(tmp_path / "w.npz")
  fid_math.save_npz(path, a=np.arange(3.0))

  def interrupted(file, **arrays):  # Writes half a file, then dies.
    with open(file, "wb") as f:
      f.write(b"PK\x03\x04half")
    raise KeyboardInterrupt
  monkeypatch.setattr(np, "savez", interrupted)
  with pytest.raises(KeyboardInterrupt):
    fid_math.save_npz(path, a=np.arange(5.0))
  monkeypatch.undo()
  np.testing.assert_array_equal(fid_math.load_npz(path, "")["a"], np.arange(3.0))
  assert os.listdir(tmp_path) == ["w.npz"]  # No temporary file left behind.


@pytest.mark.parametrize("content", [b"", b"garbage", "half"])
def test_unreadable_fmnist_weights_are_a_value_error_naming_the_path(tmp_path, content):
  import jax
  import jax.numpy as jnp
  from big_vision.evaluators import feature_nets
  from big_vision.models import fmnist_classifier
  path = str(tmp_path / "fmnist_classifier.npz")
  if content == "half":  # Good weights cut short, as an interrupted np.savez left them.
    params = fmnist_classifier.Classifier().init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 28, 28, 1)))["params"]
    fmnist_classifier.save(params, path, {})
    with open(path, "rb") as f:
      content = f.read()[:5000]
  with open(path, "wb") as f:
    f.write(content)
  with pytest.raises(ValueError, match=r"fmnist_classifier.npz \(\d+ bytes\) is not a "
                                       r"readable .npz file.*retrain the feature network: "
                                       r"train them once with `python -m "
                                       r"big_vision.tools.train_feature_net"):
    feature_nets.load("fmnist_classifier", path)


def test_fmnist_weights_of_another_network_say_to_retrain(tmp_path):
  from big_vision.models import fmnist_classifier
  path = str(tmp_path / "other.npz")
  np.savez(path, **{"Conv_0/kernel": np.zeros((3, 3, 1, 16))})
  with pytest.raises(ValueError, match="does not hold fmnist_classifier weights.*retrain"):
    fmnist_classifier.load(path)
