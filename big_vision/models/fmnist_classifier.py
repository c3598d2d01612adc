"""A small CNN classifier of Fashion-MNIST, used as the domain feature network for
FID/IS-style metrics where Inception (an ImageNet network) would be meaningless and its
weights are unavailable. Metrics computed with it are named after it, never plain "FID".

Weights live in a .npz of flattened parameter paths (no pickle), with a .json beside it
recording how it was trained and its test accuracy.
"""
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision.evaluators import fid_math  # numpy only: its atomic .npz writer and reader.

NAME = "fmnist_classifier"
IMAGE_SHAPE = (28, 28, 1)  # Fashion-MNIST's, the only images it takes.
# Float32 products on every device (not TF32 on GPUs, bfloat16 passes on TPUs): the same
# features, and FID/IS, wherever the metrics are computed.
PRECISION = jax.lax.Precision.HIGHEST


class Classifier(nn.Module):
  """conv16-conv16-pool-conv32-conv32-pool-dense128 -> 10 logits."""
  num_classes: int = 10
  feature_dim: int = 128

  @nn.compact
  def __call__(self, images):
    """images [B, 28, 28, 1] in [-1, 1] -> (features [B, 128], logits [B, 10])."""
    x = images
    for width in (16, 32):
      x = nn.relu(nn.Conv(width, (3, 3), precision=PRECISION)(x))
      x = nn.relu(nn.Conv(width, (3, 3), precision=PRECISION)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.feature_dim, precision=PRECISION)(x))
    return features, nn.Dense(self.num_classes, precision=PRECISION)(features)


def save(params, path, info):
  """Writes the weights (.npz) and `info` (.json beside it), each atomically: an interrupted
  write leaves the old file or none, never half of one."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  fid_math.save_npz(path, **{k: np.asarray(v) for k, v in flat.items()})
  info_path = os.path.splitext(path)[0] + ".json"
  tmp = f"{info_path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, info_path)


def _train_hint(path):
  return (f"train them once with `python -m big_vision.tools.train_feature_net --out {path}` "
          "(a few minutes on a CPU)")


def load(path):
  """Returns params. A missing file raises FileNotFoundError, an unreadable one (empty,
  truncated) or one of other weights ValueError; both say how to make it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"feature network weights {path} not found; {_train_hint(path)}")
  flat = fid_math.load_npz(path, f"retrain the feature network: {_train_hint(path)}")
  expected = jax.eval_shape(lambda: Classifier().init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, *IMAGE_SHAPE)))["params"])
  want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(expected, sep="/").items()}
  got = {k: v.shape for k, v in flat.items()}
  if want != got:
    raise ValueError(f"{path} does not hold {NAME} weights: expected {want}, found {got}; "
                     f"retrain the feature network: {_train_hint(path)}")
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()},
                                           sep="/")


def feature_fn(path):
  """A jitted fn: images [B,28,28,1] in [-1,1] -> (features [B,128], probs [B,10])."""
  params = load(path)
  model = Classifier()

  @jax.jit
  def fn(images):
    features, logits = model.apply({"params": params}, images)
    return features, jax.nn.softmax(logits)
  return fn
