"""Feature networks for FID / IS: what each is called and how it is loaded.

  inception:          the standard Inception-v3 FID network (pool features, 1008 logits),
                      from a local weights file (see big_vision/models/inception.py).
  fmnist_classifier:  our own Fashion-MNIST CNN (big_vision/models/fmnist_classifier.py).
Metrics computed with anything but Inception carry the network's name ("fid_fmnist_classifier"),
so they are never mistaken for the standard FID.
"""
import dataclasses
from typing import Callable

import numpy as np

from big_vision.evaluators import common

KINDS = ("inception", "fmnist_classifier")


@dataclasses.dataclass
class FeatureNet:
  name: str          # Used in metric names and cache keys.
  weights: str
  fn: Callable       # images [B, H, W, C] in [-1, 1] -> (features [B, D], probs [B, K]).
  image_shape: tuple | None = None  # (H, W, C) it takes; None: any (it resizes).
  channels: tuple | None = None     # The channel counts it takes, when any size goes.

  def check_images(self, image_shape, what):
    """ValueError naming `what` when images of `image_shape` (H, W, C) cannot go in."""
    shape = "x".join(map(str, image_shape))
    if self.image_shape is not None and tuple(image_shape) != self.image_shape:
      h, w, c = self.image_shape
      raise ValueError(f"{what}: feature network {self.name!r} takes {h}x{w}x{c} images, not "
                       f"{shape}; use kind='inception' (any size)")
    if self.channels is not None and image_shape[-1] not in self.channels:
      raise ValueError(f"{what}: feature network {self.name!r} takes images of "
                       f"{' or '.join(map(str, self.channels))} channels, not {shape}")

  @property
  def metric_suffix(self):
    return "" if self.name == "inception" else f"_{self.name}"

  def __call__(self, images, batch_size=250, progress=True):
    """(features [N, D], probs [N, K]) in float64; progress=False: no progress lines (for a
    caller that reports its own)."""
    feats, probs = [], []
    report = common.Progress(f"{self.name} features", len(images)) if progress else None
    for i in range(0, len(images), batch_size):
      f, p = self.fn(images[i:i + batch_size])
      feats.append(np.asarray(f, np.float64))
      probs.append(np.asarray(p, np.float64))
      if report is not None:
        report.update(len(f))
    return np.concatenate(feats), np.concatenate(probs)


def check_spec(spec):
  """ValueError unless spec is feature_net's dict(kind=..., weights=...), nothing else."""
  want = f"dict(kind=..., weights=PATH) with kind one of {', '.join(KINDS)}"
  if not hasattr(spec, "keys"):
    raise ValueError(f"feature_net={spec!r} must be {want}")
  if set(spec.keys()) != {"kind", "weights"}:
    raise ValueError(f"feature_net has keys {', '.join(sorted(spec.keys())) or 'none'}; it "
                     f"must be {want}")


def load(kind, weights):
  """FeatureNet for `kind`; a missing weights file raises FileNotFoundError saying why, an
  unreadable or wrong one ValueError (common.build reports both)."""
  if kind == "fmnist_classifier":
    from big_vision.models import fmnist_classifier  # pylint: disable=g-import-not-at-top
    return FeatureNet(kind, weights, fmnist_classifier.feature_fn(weights),
                      image_shape=fmnist_classifier.IMAGE_SHAPE)
  if kind == "inception":
    from big_vision.models import inception  # pylint: disable=g-import-not-at-top
    return FeatureNet(kind, weights, inception.feature_fn(weights),
                      channels=inception.CHANNELS)
  raise ValueError(f"unknown feature network {kind!r}; known: {', '.join(KINDS)}")
