"""Scores sets of images against real data: FID and Inception Score with a feature network.

The reference statistics of the real split are computed once and cached on disk, keyed by
dataset, split, eval preprocessing, resolution, network (and a hash of its weights file)
and image count. Shared by the sampling and inpainting evaluators.
"""
import hashlib
import os

from big_vision.evaluators import common
from big_vision.evaluators import feature_nets
from big_vision.evaluators import fid_math

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "big_vision", "fid_stats")


def weights_digest(path):
  """sha256 of the weights file's bytes (first 16 hex digits).

  The whole content, not size or mtime: a retrained or swapped network must never reuse
  stale statistics, and hashing is cheap (about 0.1 s for Inception's ~100 MB).
  """
  h = hashlib.sha256()
  with open(os.path.expanduser(path), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()[:16]


class Scorer:
  """scores(images) -> {fid{_net}, is{_net}, is{_net}_std}."""

  def __init__(self, context, feature_net, reference_cfg, max_reference=10_000,
               cache_dir=None):
    feature_nets.check_spec(feature_net)
    # Loaded now, so a missing weights file is reported before any training.
    self.net = feature_nets.load(feature_net["kind"], feature_net["weights"])
    model = context.model
    self.net.check_images((*model.image_size, model.channels), "feature_net")
    self.context, self.reference_cfg = context, reference_cfg
    self.max_reference, self.cache_dir = max_reference, cache_dir or DEFAULT_CACHE
    self._reference = None

  def real_images(self, input_cfg, max_examples):
    return common.collect(self.context, input_cfg, lambda b: {"x": b["image"]},
                          max_examples, what=f"real images {input_cfg['data']['split']}")["x"]

  def cache_key(self):
    """Fields that identify the reference statistics (see fid_math.cache_path)."""
    h, w = self.context.model.image_size
    return dict(dataset=self.reference_cfg["data"]["name"],
                split=self.reference_cfg["data"]["split"], resolution=f"{h}x{w}",
                network=self.net.name, weights=weights_digest(self.net.weights),
                pp=self.reference_cfg["pp"], max_images=str(self.max_reference))

  def reference(self):
    """(mu, sigma) of the real reference split, from the on-disk cache when present."""
    if self._reference is None:
      self._reference = fid_math.cached_reference_stats(
          self.cache_dir, self.cache_key(), lambda: fid_math.feature_statistics(
              self.net(self.real_images(self.reference_cfg, self.max_reference))[0]),
          agree=common.on_every_process)  # Computing them is collective.
    return self._reference

  def scores(self, images):
    feats, probs = self.net(images)
    mu, sigma = fid_math.feature_statistics(feats)
    s = self.net.metric_suffix
    is_mean, is_std = fid_math.inception_score(probs)
    return {f"fid{s}": float(fid_math.frechet_distance(mu, sigma, *self.reference())),
            f"is{s}": float(is_mean), f"is{s}_std": float(is_std)}
