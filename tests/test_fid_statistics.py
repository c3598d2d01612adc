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


@pytest.mark.parametrize("n,d,spectrum", [
    (100, 128, None),  # Fewer samples than features: singular covariances.
    (1000, 256, 1e-10),  # Full rank, ill-conditioned (eigenvalues from 1 down to 1e-10).
])
def test_fid_against_an_exact_form(n, d, spectrum):
  """FID against a form that needs no matrix square root: with A, B the centred samples
  over sqrt(N - 1), sigma1 = A^T A, sigma2 = B^T B, and Tr((sigma1 sigma2)^(1/2)) is the
  sum of the singular values of A B^T. Singular: 1.4e-16 off it, relative (with eigh's
  round-off zero eigenvalues kept, 3.1e-9; pytorch-fid, 5.1e-9). Ill-conditioned:
  5.8e-16 (from the eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2), which square the
  condition number: 2.4e-10, or 9.4e-8 with small ones zeroed; pytorch-fid, 3.1e-9)."""
  rng = np.random.default_rng(5)
  if spectrum is None:
    x1 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / 4 + 1.0
    x2 = rng.normal(size=(n, d)) * np.linspace(0.5, 2.0, d)
  else:
    def sample(seed):
      rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0]
      return (rng.normal(size=(n, d)) * np.sqrt(np.geomspace(1, spectrum, d))) @ rotation
    x1, x2 = sample(1), sample(2) + 0.1
  a, b = ((x - x.mean(0)) / np.sqrt(n - 1) for x in (x1, x2))
  diff = x1.mean(0) - x2.mean(0)
  exact = (diff @ diff + np.sum(a * a) + np.sum(b * b)
           - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())
  got = fid_math.frechet_distance(*fid_math.feature_statistics(x1),
                                  *fid_math.feature_statistics(x2))
  assert got == pytest.approx(exact, rel=1e-10)


def test_inception_score_splits_are_the_originals():
  """openai's (and torch-fidelity's, unshuffled) splits: rows i*N//k to (i+1)*N//k - 1,
  in order. With N = 23, k = 10 the splits hold 2, 2, 2, 3, 2, 2, 3, 2, 2, 3 rows
  (np.array_split's would be 3, 3, 3, 2, ...)."""
  p = np.random.default_rng(6).dirichlet(np.full(5, 0.3), size=23)
  bounds = [i * 23 // 10 for i in range(11)]
  assert np.diff(bounds).tolist() == [2, 2, 2, 3, 2, 2, 3, 2, 2, 3]
  scores = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    q = p[lo:hi]
    scores.append(np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1))))
  got = fid_math.inception_score(p, num_splits=10)
  np.testing.assert_allclose(got, (np.mean(scores), np.std(scores)), rtol=1e-12)


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
    scorer.real_batches = lambda cfg, n: computed.append(1) or iter(np.array_split(images, 2))
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


def test_streaming_accumulator_keeps_precision_far_from_the_origin():
  # Features with a large mean and a small spread: sum(x x^T) - n mu mu^T would cancel.
  rng = np.random.default_rng(4)
  x = 1e4 + rng.normal(size=(3000, 5)) * 1e-2
  acc = fid_math.StatisticsAccumulator()
  for part in np.array_split(x, 11):
    acc.update(part)
  acc.update(np.zeros((0, 5)))  # An empty batch changes nothing.
  mu, sigma = acc.result()
  mu_ref, sigma_ref = fid_math.feature_statistics(x)
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-6, atol=1e-12)
  assert acc.n == 3000
  with pytest.raises(ValueError, match="need at least 2"):
    fid_math.StatisticsAccumulator().result()


def test_non_finite_statistics_give_nan_not_an_eigh_error():
  """A diverged model's NaN samples made eigh raise 'Eigenvalues did not converge'."""
  for bad in (np.nan, np.inf):
    sigma = np.eye(3)
    sigma[0, 1] = sigma[1, 0] = bad
    assert np.isnan(fid_math.frechet_distance(np.zeros(3), sigma, np.zeros(3), np.eye(3)))
    assert np.isnan(fid_math.frechet_distance(np.full(3, bad), np.eye(3), np.zeros(3),
                                              np.eye(3)))
  # Singular (rank-deficient) but finite covariances need no regularisation.
  rank1 = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
  got = fid_math.frechet_distance(np.zeros(3), rank1, np.zeros(3), np.zeros((3, 3)))
  assert got == pytest.approx(np.trace(rank1), rel=1e-12)


def test_non_finite_reference_statistics_are_not_cached(tmp_path):
  key = dict(dataset="d", split="test")
  mu, sigma = fid_math.cached_reference_stats(
      str(tmp_path), key, lambda: (np.full(2, np.nan), np.eye(2)))
  assert np.isnan(mu).all() and not list(tmp_path.iterdir())


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


def _fmnist_weights(path, seed=0):
  import jax
  import jax.numpy as jnp
  from big_vision.models import fmnist_classifier
  params = fmnist_classifier.Classifier().init(jax.random.PRNGKey(seed),
                                               jnp.zeros((1, 28, 28, 1)))["params"]
  fmnist_classifier.save(params, path, {})
  return path


def _one_device_context():
  import types
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  return types.SimpleNamespace(
      data_sharding=NamedSharding(mesh, P("data")), mesh=mesh,
      model=types.SimpleNamespace(image_size=(28, 28), channels=1))


def test_reference_statistics_streamed_equal_all_at_once(tmp_path, monkeypatch):
  """Accumulated batch by batch, they equal the statistics of all the images' features at
  once; padding rows and rows past max_reference are left out."""
  from big_vision import input_pipeline
  from big_vision.evaluators import fid_scorer
  rng = np.random.default_rng(5)
  images = rng.uniform(-1, 1, (4, 6, 28, 28, 1)).astype(np.float32)
  masks = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0],
                    [0, 0, 0, 0, 0, 0]], bool)
  images[~masks] = 7.0  # Padding: would move the statistics if it were counted.
  batches = [{"image": x, input_pipeline.MASK_KEY: m} for x, m in zip(images, masks)]
  monkeypatch.setattr(input_pipeline, "evaluation", lambda cfg: (batches, 16))
  weights = _fmnist_weights(str(tmp_path / "net.npz"))
  ref_cfg = dict(data=dict(name="fashion_mnist_local", split="test"), pp="x")
  for max_reference, n in ((16, 16), (9, 9)):
    scorer = fid_scorer.Scorer(_one_device_context(),
                               dict(kind="fmnist_classifier", weights=weights), ref_cfg,
                               max_reference=max_reference, cache_dir=str(tmp_path / "c"))
    seen = []
    real_batches = scorer.real_batches
    scorer.real_batches = lambda *a: (seen.append(len(x)) or x for x in real_batches(*a))
    mu, sigma = scorer.reference()
    assert sum(seen) == n and max(seen) <= 6  # Never more than one batch at a time.
    expected = fid_math.feature_statistics(
        scorer.net(fid_scorer.to_8bit(images[masks][:n]))[0])
    np.testing.assert_allclose(mu, expected[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-8, atol=1e-12)
    assert scorer.real_images(ref_cfg, n).shape == (n, 28, 28, 1)


def test_scores_of_non_finite_images_are_nan_with_a_warning(tmp_path, caplog):
  from big_vision.evaluators import fid_scorer
  weights = _fmnist_weights(str(tmp_path / "net.npz"))
  ref_cfg = dict(data=dict(name="fashion_mnist_local", split="test"), pp="x")
  scorer = fid_scorer.Scorer(_one_device_context(),
                             dict(kind="fmnist_classifier", weights=weights), ref_cfg,
                             max_reference=40, cache_dir=str(tmp_path / "cache"))
  real = np.random.default_rng(0).uniform(-1, 1, (40, 28, 28, 1)).astype(np.float32)
  scorer.real_batches = lambda cfg, n: iter(np.array_split(real, 3))
  images = real[:20].copy()
  finite = scorer.scores(images)
  assert all(np.isfinite(v) for v in finite.values())
  images[3, 5, 5, 0] = np.nan
  with caplog.at_level("WARNING"):
    got = scorer.scores(images)
  assert set(got) == set(finite) and all(np.isnan(v) for v in got.values())
  assert "1 of 20 images to score have NaN or infinite pixels" in caplog.text
  # Reference statistics that are not finite (broken weights): FID NaN, IS still scored.
  scorer._reference = (np.full(128, np.nan), np.eye(128))
  caplog.clear()
  with caplog.at_level("WARNING"):
    got = scorer.scores(real[:20])
  assert np.isnan(got["fid_fmnist_classifier"])
  assert got["is_fmnist_classifier"] == pytest.approx(finite["is_fmnist_classifier"])
  assert "reference statistics of split 'test' are not finite" in caplog.text


def test_images_are_scored_as_8bit_images(tmp_path):
  """Generated images are rounded to 8-bit levels before scoring (real ones have them):
  samples within half a level of real images score as those images."""
  from big_vision.evaluators import fid_scorer
  levels = np.random.default_rng(1).integers(0, 256, (40, 28, 28, 1))
  real = (levels / 127.5 - 1).astype(np.float32)
  np.testing.assert_allclose(fid_scorer.to_8bit(real), real, rtol=0, atol=1e-6)
  off = real + np.random.default_rng(2).uniform(-0.49, 0.49, real.shape) / 127.5
  np.testing.assert_array_equal(fid_scorer.to_8bit(off.astype(np.float32)), real)
  assert fid_scorer.to_8bit(np.float32([-1.5, 1.5])).tolist() == [-1, 1]
  weights = _fmnist_weights(str(tmp_path / "net.npz"))
  scorer = fid_scorer.Scorer(_one_device_context(),
                             dict(kind="fmnist_classifier", weights=weights),
                             dict(data=dict(name="fashion_mnist_local", split="test"), pp="x"),
                             max_reference=40, cache_dir=str(tmp_path / "cache"))
  scorer.real_batches = lambda cfg, n: iter(np.array_split(off.astype(np.float32), 2))
  assert scorer.cache_key()["pixels"] == "8bit"
  assert scorer.scores(off.astype(np.float32)) == scorer.scores(real)
  assert scorer.scores(real)["fid_fmnist_classifier"] == pytest.approx(0, abs=1e-6)


def test_scorer_cache_key_follows_data_dir(tmp_path, monkeypatch):
  """Two datasets of one name in different directories must not share statistics."""
  from big_vision.evaluators import fid_scorer
  weights = _fmnist_weights(str(tmp_path / "net.npz"))

  def key(data_dir):
    data = dict(name="fashion_mnist_local", split="test")
    if data_dir is not None:
      data["data_dir"] = data_dir
    return fid_scorer.Scorer(_one_device_context(),
                             dict(kind="fmnist_classifier", weights=weights),
                             dict(data=data, pp="x"), cache_dir=str(tmp_path)).cache_key()

  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert key(a)["data_dir"] == a and key(b)["data_dir"] == b
  assert fid_math.cache_path("c", key(a)) != fid_math.cache_path("c", key(b))
  assert key(a + "/") == key(os.path.join(b, "..", "a")) == key(a)  # Normalised.
  monkeypatch.chdir(tmp_path)
  assert key("a") == key(a)
  monkeypatch.setenv("TFDS_DATA_DIR", b)
  assert key(None) == key(b)  # The directory input_pipeline reads when none is given.
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert key(None)["data_dir"] == os.path.expanduser("~/tensorflow_datasets")
  assert key("gs://bucket/tfds/")["data_dir"] == "gs://bucket/tfds"
  assert "builder" not in key(a)


def test_scorer_cache_key_follows_builder_arguments(tmp_path):
  """An image folder prepared again from another source folder in the same data_dir:
  its statistics are not the old ones."""
  from big_vision.evaluators import fid_scorer
  weights = _fmnist_weights(str(tmp_path / "net.npz"))
  key = lambda source: fid_scorer.Scorer(
      _one_device_context(), dict(kind="fmnist_classifier", weights=weights),
      dict(data=dict(name="image_folder_local", split="train", data_dir=str(tmp_path),
                     source_dir=source), pp="x"), cache_dir=str(tmp_path)).cache_key()
  assert key("/images/a")["builder"] == "source_dir=/images/a"
  assert fid_math.cache_path("c", key("/images/a")) != fid_math.cache_path("c", key("/b"))


_TWO_HOSTS = """
import os, sys, types
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", 2, pid)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from big_vision import input_pipeline
from big_vision.evaluators import fid_math, fid_scorer
from tests.test_fid_statistics import _fmnist_weights

def host_batches(p):  # Two local batches of 3; 5 real rows on host 0, 4 on host 1.
  images = np.random.default_rng(p).uniform(-1, 1, (2, 3, 28, 28, 1)).astype(np.float32)
  masks = np.array({0: [[1, 1, 1], [1, 1, 0]], 1: [[1, 1, 1], [1, 0, 0]]}[p], bool)
  images[~masks] = 9.0  # Padding.
  return [{"image": x, input_pipeline.MASK_KEY: m} for x, m in zip(images, masks)]
input_pipeline.evaluation = lambda cfg: (host_batches(pid), 9)
mesh = Mesh(np.array(jax.devices()), ("data",))
ctx = types.SimpleNamespace(data_sharding=NamedSharding(mesh, P("data")), mesh=mesh,
                            model=types.SimpleNamespace(image_size=(28, 28), channels=1))
weights = _fmnist_weights(os.path.join(tmp, f"net{pid}.npz"))
ref_cfg = dict(data=dict(name="fashion_mnist_local", split="test"), pp="x")
scorer = fid_scorer.Scorer(ctx, dict(kind="fmnist_classifier", weights=weights), ref_cfg,
                           max_reference=100, cache_dir=os.path.join(tmp, f"cache{pid}"))
mu, sigma = scorer.reference()
every = np.concatenate([b["image"][b[input_pipeline.MASK_KEY]] for p in (0, 1)
                        for b in host_batches(p)])
mu_all, sigma_all = fid_math.feature_statistics(scorer.net(fid_scorer.to_8bit(every))[0])
err = max(np.abs(mu - mu_all).max(), np.abs(sigma - sigma_all).max())
print("RESULT", len(every), len(scorer.real_images(ref_cfg, 100)), err < 1e-9, flush=True)
jax.distributed.shutdown()
"""


def test_reference_statistics_on_two_hosts_count_every_image_once(tmp_path):
  """Streamed over two processes' shards (with padding), the reference statistics on each
  host are those of the 9 real images of both hosts, each counted once."""
  from tests import processes  # pylint: disable=g-import-not-at-top
  port = processes.free_port()
  for out in processes.run_all([["-c", _TWO_HOSTS, str(port), str(i), str(tmp_path)]
                                for i in range(2)], timeout=200):
    assert "RESULT 9 9 True" in out, out
