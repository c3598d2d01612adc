"""FID and Inception Score statistics, in float64 numpy with the standard formulas.

FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).
The trace of the square root is the sum of the singular values of S1^(1/2) S2^(1/2) (their
squares are the eigenvalues of S1 S2). No scipy needed, and no complex round-off.
IS = exp(E_x KL(p(y|x) || p(y))), the mean and spread over `num_splits` splits.
Statistics that are not finite (a diverged model's NaN samples) give a NaN distance.

Also the .npz helpers of every file the evaluators read back (cached statistics, feature
network weights): written atomically, and read with a ValueError naming a broken file.
"""
import hashlib
import os
import re
import threading
import uuid
import zipfile

import numpy as np


def feature_statistics(features):
  """[N, D] features -> (mu [D], sigma [D, D]) in float64 (sigma with ddof=1)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"need [N >= 2, D] features, got shape {x.shape}")
  return x.mean(0), np.cov(x, rowvar=False)


class StatisticsAccumulator:
  """Streaming mean and covariance, so that 50k feature vectors need not be held at once.

  Each batch's centred scatter is merged with Chan et al.'s pairwise update, which does not
  lose precision to cancellation as sum(x x^T) - n mu mu^T does when |mu| >> std.
  The result equals feature_statistics of all the batches concatenated.
  """

  def __init__(self):
    self.n, self.mean, self.scatter = 0, None, None

  def update(self, features):
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"need [N, D] features, got shape {x.shape}")
    if self.mean is not None and x.shape[1] != len(self.mean):
      raise ValueError(f"features of dimension {x.shape[1]} after {len(self.mean)}")
    if not len(x):
      return
    mean = x.mean(0)
    centred = x - mean
    scatter = centred.T @ centred
    if self.mean is None:
      self.n, self.mean, self.scatter = len(x), mean, scatter
      return
    n = self.n + len(x)
    delta = mean - self.mean
    self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.n * len(x) / n)
    self.mean = self.mean + delta * (len(x) / n)
    self.n = n

  def result(self):
    """(mu [D], sigma [D, D]), sigma with ddof=1."""
    if self.n < 2:
      raise ValueError(f"need at least 2 feature vectors, got {self.n}")
    return self.mean.copy(), self.scatter / (self.n - 1)


def all_finite(*arrays):
  """Whether every value of every array is finite (no NaN, no inf)."""
  return all(bool(np.all(np.isfinite(a))) for a in arrays)


def _sqrt_psd(m):
  """The PSD square root, eigenvalues under 8 eps of the largest (eigh's round-off) set to
  0: a covariance of fewer samples than features is singular, and the square roots of
  its zero eigenvalues returned as +-1e-16 noise would bias FID (by 1e-8 to 4e-8 of itself
  in checks with 1000 samples of 2048 features)."""
  w, v = np.linalg.eigh((m + m.T) / 2)
  w = np.where(w > 8 * np.finfo(np.float64).eps * w.max(initial=0.0), w, 0.0)
  return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1, sigma2):
  """Tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices: the sum of the singular values
  of sigma1^(1/2) sigma2^(1/2), whose squares are the eigenvalues of sigma1 sigma2.
  (The eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2), the same in exact arithmetic,
  have the squared condition number and lose ill-conditioned statistics' small ones.)"""
  return float(np.linalg.svd(_sqrt_psd(sigma1) @ _sqrt_psd(sigma2), compute_uv=False).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  NaN when a statistic is not finite (eigh would raise "Eigenvalues did not converge").
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(
      np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  if not all_finite(mu1, sigma1, mu2, sigma2):
    return float("nan")
  # Finite PSD inputs need no regularisation (pytorch-fid's eps offset): the square roots
  # are of eigenvalues at least 0, real and finite even for singular covariances.
  tr_covmean = trace_sqrt_product(sigma1, sigma2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(probs, num_splits=10):
  """(mean, std) of exp(E KL(p(y|x) || p(y))) over splits of [N, K] class probabilities.

  The conventions of openai's original code (improved-gan), which torch-fidelity follows
  too: the k splits are consecutive, in the given order, split i holding rows i*N//k to
  (i+1)*N//k - 1 (every row used); p(y) is each split's mean; the spread is the
  standard deviation over the splits (ddof 0). (torch-fidelity's default shuffles the
  rows first, which changes the splits: by 1e-4 to 2e-3 of the score in a check.) 0 log 0
  is taken as 0 (the original gives NaN for an exactly one-hot row)."""
  p = np.asarray(probs, np.float64)
  if p.ndim != 2 or not np.allclose(p.sum(1), 1.0, atol=1e-3) or (p < 0).any():
    raise ValueError(f"inception_score needs [N, K] rows of probabilities summing to 1; "
                     f"got shape {p.shape}")
  num_splits = max(1, min(num_splits, len(p)))
  scores = []
  n = len(p)
  for i in range(num_splits):
    part = p[i * n // num_splits:(i + 1) * n // num_splits]
    marginal = part.mean(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def save_npz(path, **arrays):
  """np.savez(path, **arrays), atomically: an interrupted write leaves no half file.

  Written to a temporary file in the same directory (the same file system), then renamed.
  The temporary name is this writer's own: several processes (hosts sharing a directory)
  may write the same file at once.
  """
  path = os.path.expanduser(os.fspath(path))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp.npz"
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # Atomic: concurrent readers never see half a file.
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_npz(path, remedy):
  """{name: numpy array} of an .npz (no pickle).

  A missing file raises FileNotFoundError; an empty, truncated or otherwise unreadable one
  a ValueError naming the path and ending with `remedy` (what to do about it).
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; {remedy}")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
    size = os.path.getsize(path)
    raise ValueError(f"{path} ({size} bytes) is not a readable .npz file, empty, truncated "
                     f"or corrupt ({type(e).__name__}: {e}); {remedy}") from e


def save_statistics(path, mu, sigma, **metadata):
  save_npz(path, mu=mu, sigma=sigma,
           **{f"meta_{k}": np.asarray(str(v)) for k, v in metadata.items()})


def load_statistics(path):
  data = load_npz(path, "delete it: the statistics are computed again")
  if "mu" not in data or "sigma" not in data:
    raise ValueError(f"{path} holds no FID statistics (mu, sigma); delete it: the "
                     "statistics are computed again")
  meta = {k[5:]: str(v) for k, v in data.items() if k.startswith("meta_")}
  return data["mu"], data["sigma"], meta


def cache_path(cache_dir, key_fields):
  """A readable, collision-safe file name for the statistics keyed by key_fields."""
  text = "_".join(f"{k}-{v}" for k, v in sorted(key_fields.items()))
  digest = hashlib.sha256(text.encode()).hexdigest()[:10]
  return os.path.join(cache_dir, re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:150] + f"_{digest}.npz")


def cached_reference_stats(cache_dir, key_fields, compute_fn, agree=bool):
  """(mu, sigma) from the cache file for key_fields, computing and saving it if missing.

  compute_fn() -> (mu, sigma). key_fields should name dataset, split, resolution and
  feature network. agree(found here) -> whether to read the file: when compute_fn is
  collective (several processes), every process must take the same branch.
  Statistics that are not finite are returned but not saved.
  """
  path = cache_path(cache_dir, key_fields)
  if agree(os.path.exists(path)):
    mu, sigma, _ = load_statistics(path)
    return mu, sigma
  mu, sigma = compute_fn()
  if all_finite(mu, sigma):
    save_statistics(path, mu, sigma, **key_fields)
  return mu, sigma
