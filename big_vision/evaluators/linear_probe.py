"""Closed-form few-shot linear probe (big_vision's regularised least squares), in numpy.

Targets are +-1 one-hot vectors; the readout W minimises ||X W - Y||^2 + l2 ||W||^2 on
centred features with a bias column. The ridge strength is chosen on a held-out part of
the train pool (never on the test split). Kept apart from the evaluator so the math is
testable on synthetic features.
"""
import numpy as np

from big_vision.config_parsing import ConfigError
from big_vision.config_parsing import is_int

L2_GRID = tuple(2.0 ** np.arange(-10, 21, 2))


def fit(x, y, num_classes, l2):
  """Returns (W, mean): the ridge readout on centred features, float64."""
  x = np.asarray(x, np.float64)
  mean = x.mean(0)
  xc = np.concatenate([x - mean, np.ones((len(x), 1))], axis=1)
  targets = 2.0 * np.eye(num_classes)[y] - 1.0
  n, d = xc.shape
  if n < d:  # Dual form: an n x n system instead of d x d (few shots, wide features).
    w = xc.T @ np.linalg.solve(xc @ xc.T + l2 * np.eye(n), targets)
  else:
    w = np.linalg.solve(xc.T @ xc + l2 * np.eye(d), xc.T @ targets)
  return w, mean


def predict(w, mean, x):
  x = np.asarray(x, np.float64) - mean
  return np.argmax(np.concatenate([x, np.ones((len(x), 1))], axis=1) @ w, axis=1)


def accuracy(w, mean, x, y):
  return float(np.mean(predict(w, mean, x) == np.asarray(y)))


def select_shots(labels, shots, rng, exclude=()):
  """Indices of `shots` random examples of every class, avoiding `exclude`."""
  labels = np.asarray(labels)
  excluded = np.zeros(len(labels), bool)
  excluded[list(exclude)] = True
  chosen = []
  for c in np.unique(labels):
    pool = np.flatnonzero((labels == c) & ~excluded)
    if len(pool) < shots:
      raise ValueError(f"class {c} has {len(pool)} examples left, fewer than {shots} shots")
    chosen.append(rng.choice(pool, shots, replace=False))
  return np.concatenate(chosen)


def check_options(shots, seeds, holdout_per_class):
  """Raises ConfigError unless shots are ints >= 1 (at least one) and seeds and
  holdout_per_class are ints >= 1: without them the probe reports nan, or a ridge strength
  chosen on no examples at all."""
  def is_count(v):
    return is_int(v) and v >= 1
  shots = tuple(shots) if isinstance(shots, (list, tuple)) else shots
  if not isinstance(shots, tuple) or not shots or not all(is_count(k) for k in shots):
    raise ConfigError(f"few-shot probe: shots={shots!r} must be a non-empty list of ints >= 1")
  for name, value in (("seeds", seeds), ("holdout_per_class", holdout_per_class)):
    if not is_count(value):
      raise ConfigError(f"few-shot probe: {name}={value!r} must be an int >= 1")


def check_pool(train_y, test_y, shots, holdout_per_class):
  """Raises ConfigError unless every class has holdout_per_class + max(shots) examples.

  Checked before any fitting, so a too small train_split fails with one line naming the
  class (at the probe's first run: the counts are known once the features are). Classes
  seen only in the test split count too: the probe could never predict them.
  """
  need = holdout_per_class + max(shots)
  classes = np.union1d(np.unique(train_y), np.unique(test_y))
  counts = np.array([np.sum(train_y == c) for c in classes])
  if counts.size and counts.min() < need:
    c = classes[int(np.argmin(counts))]
    raise ConfigError(
        f"few-shot probe: class {c} has {counts.min()} training examples, fewer than "
        f"holdout_per_class={holdout_per_class} + max(shots)={max(shots)} = {need}; "
        "use a larger train_split or fewer shots / a smaller holdout_per_class")


def few_shot(train_x, train_y, test_x, test_y, *, shots=(1, 5, 10, 25, 100), seeds=3,
             holdout_per_class=20, l2_grid=L2_GRID):
  """Accuracy per shot count: {shots: (mean, std, [per-seed], [chosen l2])}."""
  check_options(shots, seeds, holdout_per_class)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  check_pool(train_y, test_y, shots, holdout_per_class)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  results = {}
  for k in shots:
    accs, l2s = [], []
    for seed in range(seeds):
      rng = np.random.default_rng(seed)
      holdout = select_shots(train_y, holdout_per_class, rng)
      idx = select_shots(train_y, k, rng, exclude=holdout)
      scores = []
      for l2 in l2_grid:
        w, mean = fit(train_x[idx], train_y[idx], num_classes, l2)
        scores.append(accuracy(w, mean, train_x[holdout], train_y[holdout]))
      best = l2_grid[int(np.argmax(scores))]
      w, mean = fit(train_x[idx], train_y[idx], num_classes, best)
      accs.append(accuracy(w, mean, test_x, test_y))
      l2s.append(best)
    results[k] = (float(np.mean(accs)), float(np.std(accs)), accs, l2s)
  return results
