"""Scores sets of images against real data: FID and Inception Score with a feature network.

The reference statistics of the real split are computed once and cached on disk, keyed by
dataset, its data_dir, split, eval preprocessing, resolution, network (and a hash of its
weights file) and image count. They are accumulated batch by batch (the reference images
are never all held at once). Shared by the sampling and inpainting evaluators.

Both sets are scored as 8-bit images (to_8bit): generated images are rounded to the 256
levels that real ones have, as the evaluations of ADM and DiT score saved samples.

Images or features that are not finite (a diverged model's NaN samples) give NaN scores
and a logged warning saying why, so that training goes on.
"""
import hashlib
import os

from absl import logging
import jax
import numpy as np

from big_vision import fileio
from big_vision import input_pipeline
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


def data_dir_key(data_dir):
  """The data directory the dataset is read from, as one normalised string.

  None means TFDS's default (TFDS_DATA_DIR, else ~/tensorflow_datasets), as
  input_pipeline.get_dataset_builder resolves it; local paths are made absolute, URLs
  (gs://...) are kept, less a trailing slash.
  """
  data_dir = (data_dir or os.environ.get("TFDS_DATA_DIR")
              or os.path.join("~", "tensorflow_datasets"))
  return fileio.absolute(os.path.expanduser(os.fspath(data_dir)))


def _warn(text):
  if jax.process_index() == 0:  # Every process computes the same scores.
    logging.warning("%s", text)


def to_8bit(images):
  """Images in [-1, 1] rounded to the 256 levels of 8-bit pixels (x / 127.5 - 1), in
  their own dtype; those of an 8-bit dataset keep their values (to float rounding)."""
  images = np.asarray(images)
  levels = np.round((np.clip(images.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5)
  return (levels / 127.5 - 1.0).astype(images.dtype)


def optional_scorer(context, feature_net, *scorer_args):
  """(Scorer, None); (None, None) without a feature_net; (None, why) when its weights file
  is missing: the eval then runs without FID/IS, and common.build says so."""
  if not feature_net:
    return None, None
  try:
    return Scorer(context, feature_net, *scorer_args), None
  except FileNotFoundError as e:
    return None, str(e)


class Scorer:
  """scores(images) -> {fid{_net}, is{_net}, is{_net}_std}."""

  def __init__(self, context, feature_net, reference_cfg, max_reference=10_000,
               cache_dir=None):
    feature_nets.check_spec(feature_net)
    # Loaded now, so a missing or broken weights file is reported before any training.
    self.net = feature_nets.load(feature_net["kind"], feature_net["weights"])
    model = context.model
    self.net.check_images((*model.image_size, model.channels), "feature_net")
    self.context, self.reference_cfg = context, reference_cfg
    self.max_reference, self.cache_dir = max_reference, cache_dir or DEFAULT_CACHE
    self._reference = None

  def real_batches(self, input_cfg, max_examples):
    """Yields the real images of input_cfg ([B, H, W, C] numpy, padding left out), batch by
    batch; every process gets every process's images, each once."""
    what = f"real images {input_cfg['data']['split']}"
    for batch in common.iterate(self.context, input_cfg, max_examples, what=what):
      valid = common.gather(batch[input_pipeline.MASK_KEY]).astype(bool)
      images = common.gather(batch["image"])[valid]
      if len(images):
        yield images

  def real_images(self, input_cfg, max_examples):
    """All the real images of input_cfg at once (for as many as the samples, not more)."""
    parts = list(self.real_batches(input_cfg, max_examples))
    if not parts:
      raise ValueError(f"no real images in split {input_cfg['data']['split']!r}")
    return np.concatenate(parts)

  def cache_key(self):
    """Fields that identify the reference statistics (see fid_math.cache_path)."""
    h, w = self.context.model.image_size
    data = self.reference_cfg["data"]
    key = dict(dataset=data["name"], data_dir=data_dir_key(data.get("data_dir")),
               split=data["split"], resolution=f"{h}x{w}",
               network=self.net.name, weights=weights_digest(self.net.weights),
               pp=self.reference_cfg["pp"], max_images=str(self.max_reference),
               pixels="8bit")
    builder = input_pipeline.builder_kwargs(data)  # E.g. an image folder's source_dir.
    if builder:
      key["builder"] = ",".join(f"{k}={v}" for k, v in sorted(builder.items()))
    return key

  def reference_statistics(self):
    """(mu, sigma) of the reference split's features, accumulated batch by batch."""
    acc = fid_math.StatisticsAccumulator()
    for images in self.real_batches(self.reference_cfg, self.max_reference):
      acc.update(self.net(to_8bit(images), progress=False)[0])
    return acc.result()

  def reference(self):
    """(mu, sigma) of the real reference split, from the on-disk cache when present."""
    if self._reference is None:
      self._reference = fid_math.cached_reference_stats(
          self.cache_dir, self.cache_key(), self.reference_statistics,
          agree=common.on_every_process)  # Computing them is collective.
    return self._reference

  def scores(self, images):
    s = self.net.metric_suffix
    not_scored = {f"fid{s}": float("nan"), f"is{s}": float("nan"), f"is{s}_std": float("nan")}
    images = np.asarray(images)
    bad = int(np.sum(~np.isfinite(images).reshape(len(images), -1).all(1)))
    if bad:
      _warn(f"{bad} of {len(images)} images to score have NaN or infinite pixels (a diverged "
            f"model?): fid{s} and is{s} are NaN")
      return not_scored
    feats, probs = self.net(to_8bit(images))
    if not fid_math.all_finite(feats, probs):
      _warn(f"the {self.net.name} network's features of the images to score are not finite "
            f"(weights {self.net.weights} broken?): fid{s} and is{s} are NaN")
      return not_scored
    mu, sigma = fid_math.feature_statistics(feats)
    is_mean, is_std = fid_math.inception_score(probs)
    ref = self.reference()
    if not fid_math.all_finite(*ref):
      _warn(f"the reference statistics of split {self.reference_cfg['data']['split']!r} are "
            f"not finite (weights {self.net.weights} of the {self.net.name} network broken?); "
            f"not cached: fid{s} is NaN")
    return {f"fid{s}": fid_math.frechet_distance(mu, sigma, *ref),
            f"is{s}": float(is_mean), f"is{s}_std": float(is_std)}
