"""The standard Inception-v3 FID network (the 2015-12-05 TensorFlow graph) in Flax.

The architecture of the FID Inception used by pytorch-fid: Inception-v3 whose average
pools in the A, C and first E blocks exclude padding from the mean, and whose last E block
max-pools its pool branch; 2048-d pool features and a 1008-way classifier (for IS).
Inference only: batch norm uses stored statistics (eps 1e-3).

Weights cannot be downloaded here. Obtain `pt_inception-2015-12-05-6726825d.pth` (the
pytorch-fid release file) once, convert it with
  python -m big_vision.tools.convert_inception_weights --src pt_inception-...pth --out inception_fid.npz
and point the config's feature_net weights at the .npz.

Images enter in [-1, 1], any size and 1 or 3 channels; they are resized bilinearly to
299x299 (without antialiasing, like torch's interpolate; TF's original resize differs
slightly, so absolute FIDs can differ from TF-computed ones in the decimals).
"""
import functools
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision.evaluators import fid_math  # numpy only: its atomic .npz writer and reader.

NAME = "inception"
NUM_LOGITS = 1008
CHANNELS = (1, 3)  # Grey images are tiled to RGB; any other count is refused.
# Float32 products on every device: XLA's default rounds a float32 product's inputs to
# TF32 on GPUs (10 bits of mantissa) and to bfloat16 passes on TPUs (8 bits), which would
# move the features, and FID, which papers compare in its decimals, with the device. In
# float32 they match pytorch-fid's network to 2e-6 of their size (on a CPU:
# scripts/check_inception_against_pytorch_fid.py).
PRECISION = jax.lax.Precision.HIGHEST


class ConvBN(nn.Module):
  """Conv (no bias) + inference batch norm + ReLU: TF's BasicConv2d."""
  features: int
  kernel: tuple = (1, 1)
  strides: tuple = (1, 1)
  padding: object = "VALID"

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, padding=self.padding, use_bias=False,
                precision=PRECISION, name="conv")(x)
    # Batch-norm statistics are plain parameters here: the network only ever infers.
    bn = lambda name, init: self.param(name, init, (self.features,))
    scale, bias = bn("scale", nn.initializers.ones), bn("bias", nn.initializers.zeros)
    mean, var = bn("mean", nn.initializers.zeros), bn("var", nn.initializers.ones)
    x = (x - mean) * jax.lax.rsqrt(var + 1e-3) * scale + bias
    return nn.relu(x)


def _pad(kh, kw):
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def conv(features, kh=1, kw=None, strides=1, same=True, name=None):
  kw = kh if kw is None else kw
  return ConvBN(features, (kh, kw), (strides, strides), _pad(kh, kw) if same else "VALID",
                name=name)


def avg_pool_exclude_pad(x):
  """3x3 stride-1 average pool whose mean ignores the zero padding (count_include_pad=False)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(jnp.pad(x, pad), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                "VALID")
  ones = jnp.pad(jnp.ones(x.shape[1:3] + (1,), x.dtype)[None], pad)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "VALID")
  return total / count


def max_pool(x, stride, same=False):
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)) if same else "VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(64, 5, name="branch5x5_2")(conv(48, name="branch5x5_1")(x))
    b3 = conv(96, 3, name="branch3x3dbl_3")(conv(96, 3, name="branch3x3dbl_2")(
        conv(64, name="branch3x3dbl_1")(x)))
    bp = conv(self.pool_features, name="branch_pool")(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = conv(384, 3, strides=2, same=False, name="branch3x3")(x)
    bd = conv(96, 3, strides=2, same=False, name="branch3x3dbl_3")(
        conv(96, 3, name="branch3x3dbl_2")(conv(64, name="branch3x3dbl_1")(x)))
    return jnp.concatenate([b3, bd, max_pool(x, 2)], -1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, 1, 7, name="branch7x7_2")(b7)
    b7 = conv(192, 7, 1, name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, 7, 1, name="branch7x7dbl_2")(bd)
    bd = conv(c7, 1, 7, name="branch7x7dbl_3")(bd)
    bd = conv(c7, 7, 1, name="branch7x7dbl_4")(bd)
    bd = conv(192, 1, 7, name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = conv(320, 3, strides=2, same=False, name="branch3x3_2")(
        conv(192, name="branch3x3_1")(x))
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, 1, 7, name="branch7x7x3_2")(b7)
    b7 = conv(192, 7, 1, name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, strides=2, same=False, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 2)], -1)


class InceptionE(nn.Module):
  max_pool_branch: bool  # The FID graph's last block max-pools; the one before averages.

  @nn.compact
  def __call__(self, x):
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, 1, 3, name="branch3x3_2a")(b3),
                          conv(384, 3, 1, name="branch3x3_2b")(b3)], -1)
    bd = conv(384, 3, name="branch3x3dbl_2")(conv(448, name="branch3x3dbl_1")(x))
    bd = jnp.concatenate([conv(384, 1, 3, name="branch3x3dbl_3a")(bd),
                          conv(384, 3, 1, name="branch3x3dbl_3b")(bd)], -1)
    pooled = max_pool(x, 1, same=True) if self.max_pool_branch else avg_pool_exclude_pad(x)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """images [B, H, W, 1 or 3] in [-1, 1] -> (pool features [B, 2048], logits [B, 1008]).

  The logits include fc/bias; the Inception Score leaves it out (see feature_fn).
  """

  @nn.compact
  def __call__(self, images):
    x = jnp.asarray(images, jnp.float32)
    # The resize below would interpolate 2 or 4 channels into 3 without a word.
    if x.ndim != 4 or x.shape[-1] not in CHANNELS:
      raise ValueError(f"the Inception FID network takes images [B, H, W, 1 or 3], not shape "
                       f"{tuple(x.shape)}")
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    x = jax.image.resize(x, (x.shape[0], 299, 299, 3), "bilinear", antialias=False)
    x = conv(32, 3, strides=2, same=False, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, same=False, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, name="Conv2d_2b_3x3")(x)
    x = max_pool(x, 2)
    x = conv(80, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, same=False, name="Conv2d_4a_3x3")(x)
    x = max_pool(x, 2)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    features = x.mean(axis=(1, 2))
    return features, nn.Dense(NUM_LOGITS, precision=PRECISION, name="fc")(features)


@functools.lru_cache(maxsize=1)
def expected_shapes():
  """{flat name: shape} of every weight the network needs."""
  shapes = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 75, 75, 3))))["params"]
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(shapes, sep="/").items()}


def _convert_hint(path):
  return ("Download pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) on a machine "
          "that can, then run `python -m big_vision.tools.convert_inception_weights --src "
          f"that.pth --out {path}`")


def load_fid_weights(path):
  """Params from a converted .npz; every name and shape is checked.

  FileNotFoundError when it is missing; ValueError when it is unreadable (empty, truncated)
  or holds other weights. Both say how to make it.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Inception FID weights {path} not found. {_convert_hint(path)}")
  flat = fid_math.load_npz(path, f"re-run the conversion. {_convert_hint(path)}")
  want = expected_shapes()
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  misshaped = sorted(k for k in set(want) & set(flat) if tuple(flat[k].shape) != want[k])
  if missing or unexpected or misshaped:
    detail = "; ".join(f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                       for what, names in (("missing", missing), ("unexpected", unexpected),
                                           ("wrong shape", misshaped)) if names)
    raise ValueError(f"{path} is not an Inception FID weights file ({detail}). "
                     f"{_convert_hint(path)}")
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()},
                                           sep="/")


def save_flat_weights(flat, path):
  """Writes {"Mixed_5b/branch1x1/conv/kernel": array, ...} as float32, atomically (an
  interrupted write leaves no half file)."""
  fid_math.save_npz(path, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def save_weights(params, path):
  save_flat_weights(flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/"), path)


def make_random_weights(path, seed=0):
  """A weights file of the right structure with random values (for tests only)."""
  params = FIDInceptionV3().init(jax.random.PRNGKey(seed), jnp.zeros((1, 75, 75, 3)))["params"]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  rng = np.random.default_rng(seed)
  for k in flat:
    if k.endswith("/var"):
      flat[k] = rng.uniform(0.5, 1.5, flat[k].shape)
    elif k.endswith("/mean"):
      flat[k] = rng.normal(0, 0.1, flat[k].shape)
  save_weights(flax.traverse_util.unflatten_dict(flat, sep="/"), path)
  return path


def feature_fn(path):
  """A jitted fn: images in [-1, 1] -> (pool features [B, 2048], probabilities [B, 1008]).

  The probabilities (for the Inception Score) are the softmax of pool3 @ fc/kernel WITHOUT
  fc/bias, as openai's original IS code (softmax/logits/MatMul's weight only) and
  torch-fidelity's default "logits_unbiased": published IS figures are computed so.
  """
  params = load_fid_weights(path)
  model = FIDInceptionV3()

  @jax.jit
  def fn(images):
    features, _ = model.apply({"params": params}, images)
    return features, jax.nn.softmax(jnp.dot(features, params["fc"]["kernel"],
                                            precision=PRECISION))
  return fn
