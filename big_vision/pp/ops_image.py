"""Image preprocessing ops (single examples, TF tensors of shape [H, W, C]).

Every factory takes a `key` keyword (default "image") naming the entry it
works on and returns a function dict -> new dict; the input dict is never
modified. Random ops take their seed from the example, see `pp/rng.py`.
"""
from typing import Sequence

import tensorflow as tf

from big_vision.pp import rng
from big_vision.pp.registry import register


def _hw(size, op: str) -> tuple[int, int]:
  """Normalises an int or (height, width) pair to a (height, width) tuple."""
  if isinstance(size, int) and not isinstance(size, bool) and size > 0:
    return size, size
  if (isinstance(size, Sequence) and len(size) == 2
      and all(isinstance(s, int) and s > 0 for s in size)):
    return int(size[0]), int(size[1])
  raise ValueError(f"{op}: size={size!r} must be a positive int or a "
                   "(height, width) pair of positive ints.")


def _get(data: dict, key: str, op: str, decoded: bool = True) -> tf.Tensor:
  if key not in data:
    raise KeyError(f"{op}: example has no key {key!r}; it has "
                   f"{sorted(data)}.")
  if decoded and data[key].dtype == tf.string:
    raise ValueError(f"{op}: {key!r} is still an encoded image (tf.string); "
                     "put `decode` before it in the pp string.")
  return data[key]


def _image_op(op: str, key: str, fn, decoded: bool = True):
  """Wraps an image -> image function into a dict -> dict op."""
  def _op(data):
    return {**data, key: fn(_get(data, key, op, decoded))}
  return _op


def _cast_like(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  """Casts a float result back to `dtype`, rounding instead of truncating."""
  if dtype.is_integer:
    return tf.saturate_cast(tf.round(image), dtype)
  return tf.cast(image, dtype)


_RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5",
                   "gaussian", "mitchellcubic")


def _check_method(method, op):
  """tf.image.resize would reject a bad method only inside tf.data, deep in a traceback."""
  if method not in _RESIZE_METHODS:
    raise ValueError(f"{op}: method={method!r} is not a resize method; known: "
                     f"{', '.join(_RESIZE_METHODS)}")


def _resize(image, hw, method, antialias):
  resized = tf.image.resize(image, hw, method=method, antialias=antialias)
  return _cast_like(resized, image.dtype)


@register("decode")
def get_decode(channels=3, key="image"):
  """Decodes PNG/JPEG/GIF/BMP bytes; an already decoded image passes through.

  Already decoded (non-string) images are returned unchanged, whatever
  `channels` says; use `to_rgb` / `rgb_to_grayscale` to change channels.
  """
  def _decode(image):
    if image.dtype != tf.string:
      return image
    return tf.io.decode_image(image, channels=channels, expand_animations=False)
  return _image_op("decode", key, _decode, decoded=False)


@register("resize")
def get_resize(size, method="bilinear", antialias=False, key="image"):
  """Resizes to `size` (int for square, or (height, width)); keeps dtype."""
  hw = _hw(size, "resize")
  _check_method(method, "resize")
  return _image_op("resize", key,
                   lambda image: _resize(image, hw, method, antialias))


@register("resize_small")
def get_resize_small(size, method="area", antialias=False, key="image"):
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  if not isinstance(size, int) or size <= 0:
    raise ValueError(f"resize_small: size={size!r} must be a positive int.")
  _check_method(method, "resize_small")

  def _resize_small(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ratio = size / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32)
    return _resize(image, tf.stack([new_h, new_w]), method, antialias)
  return _image_op("resize_small", key, _resize_small)


@register("central_crop")
def get_central_crop(size, key="image"):
  """Crops the central (height, width) window; the image must be that large."""
  ch, cw = _hw(size, "central_crop")

  def _central_crop(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    check = tf.debugging.assert_greater_equal(
        tf.stack([h, w]), tf.constant([ch, cw]),
        message=f"central_crop({size}): image is smaller than the crop")
    with tf.control_dependencies([check]):  # Slicing would clamp silently.
      top, left = (h - ch) // 2, (w - cw) // 2
      return tf.identity(image[top:top + ch, left:left + cw])
  return _image_op("central_crop", key, _central_crop)


def _inception_crop(data, key, size, area_min, area_max, ratio_min, ratio_max,
                    method, antialias, op):
  """Random crop covering [area_min, area_max] % of the image, then resize."""
  data, seed = rng.next_seed(data)
  image = _get(data, key, op)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed, min_object_covered=0.0,  # No boxes, so no coverage demand.
      aspect_ratio_range=(ratio_min, ratio_max),
      area_range=(area_min / 100, area_max / 100),
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  crop.set_shape([None, None, image.shape[-1]])  # tf.slice loses channels.
  if size is not None:
    crop = _resize(crop, _hw(size, op), method, antialias)
  return {**data, key: crop}


def _check_area(area_min, area_max, op):
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"{op}: need 0 < area_min <= area_max <= 100 (percent of "
                     f"the image), got area_min={area_min}, area_max={area_max}.")


@register("inception_crop")
def get_inception_crop(size=None, area_min=5, area_max=100, ratio_min=3 / 4,
                       ratio_max=4 / 3, method="bilinear", antialias=False,
                       key="image"):
  """Inception-style random crop; areas are percent of the image."""
  _check_area(area_min, area_max, "inception_crop")
  _check_method(method, "inception_crop")
  if size is not None:
    _hw(size, "inception_crop")  # Validate early.
  return lambda data: _inception_crop(
      data, key, size, area_min, area_max, ratio_min, ratio_max, method,
      antialias, "inception_crop")


@register("decode_jpeg_and_inception_crop")
def get_decode_jpeg_and_inception_crop(size=None, area_min=5, area_max=100,
                                       ratio_min=3 / 4, ratio_max=4 / 3,
                                       method="bilinear", antialias=False,
                                       key="image"):
  """`decode|inception_crop(...)` in one op (always 3 channels).

  Unlike big_vision this decodes the whole image first (any format, not only
  JPEG), trading a little speed for robustness.
  """
  decode = get_decode(channels=3, key=key)
  crop = get_inception_crop(size, area_min, area_max, ratio_min, ratio_max,
                            method, antialias, key)
  return lambda data: crop(decode(data))


@register("random_crop")
def get_random_crop(size, key="image"):
  """Random (height, width) crop; use after `pad` for CIFAR-style shifts."""
  ch, cw = _hw(size, "random_crop")

  def _random_crop(data):
    data, seed = rng.next_seed(data)
    image = _get(data, key, "random_crop")
    crop_shape = tf.stack([ch, cw, tf.shape(image)[-1]])
    crop = tf.image.stateless_random_crop(image, crop_shape, seed=seed)
    return {**data, key: crop}
  return _random_crop


@register("flip_lr")
def get_flip_lr(key="image"):
  """Flips left-right with probability 1/2."""
  def _flip_lr(data):
    data, seed = rng.next_seed(data)
    image = _get(data, key, "flip_lr")
    return {**data, key: tf.image.stateless_random_flip_left_right(image, seed)}
  return _flip_lr


@register("value_range")
def get_value_range(vmin=-1, vmax=1, in_min=0, in_max=255, clip_values=False,
                    key="image"):
  """Linearly maps [in_min, in_max] to [vmin, vmax]; output is float32."""
  if in_max == in_min:
    raise ValueError(f"value_range: in_min and in_max are both {in_min}.")

  def _value_range(image):
    image = (tf.cast(image, tf.float32) - in_min) / (in_max - in_min)
    image = vmin + image * (vmax - vmin)
    if clip_values:
      image = tf.clip_by_value(image, min(vmin, vmax), max(vmin, vmax))
    return image
  return _image_op("value_range", key, _value_range)


@register("standardize")
def get_standardize(mean, std, key="image"):
  """(image - mean) / std per channel (scalars or per-channel lists)."""
  def _standardize(image):
    return (tf.cast(image, tf.float32) - mean) / std
  return _image_op("standardize", key, _standardize)


@register("pad_to_size")
def get_pad_to_size(size, value=0, key="image"):
  """Pads the image equally on all sides (extra pixel at bottom/right)."""
  th, tw = _hw(size, "pad_to_size")

  def _pad(image):
    static_hw = image.shape[:2]
    if any(s is not None and s > t for s, t in zip(static_hw, (th, tw))):
      raise ValueError(f"pad_to_size({size}): image of shape {image.shape} is "
                       "larger than the target size.")
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    check = tf.debugging.assert_less_equal(
        tf.stack([h, w]), tf.constant([th, tw]),
        message=f"pad_to_size({size}): image is larger than the target size")
    with tf.control_dependencies([check]):  # Else tf.pad's cryptic error.
      top, left = (th - h) // 2, (tw - w) // 2
    paddings = [[top, th - h - top], [left, tw - w - left], [0, 0]]
    padded = tf.pad(image, paddings, constant_values=tf.cast(value, image.dtype))
    return tf.ensure_shape(padded, [th, tw, image.shape[-1]])
  return _image_op("pad_to_size", key, _pad)


register("pad")(get_pad_to_size)


@register("grayscale_to_rgb")
def get_grayscale_to_rgb(key="image"):
  """Repeats a single channel three times; 3-channel images pass through."""
  def _to_rgb(image):
    if image.shape[-1] == 3:
      return image
    if image.shape[-1] != 1:
      raise ValueError(f"grayscale_to_rgb: expected 1 or 3 channels, image "
                       f"has shape {image.shape}.")
    return tf.image.grayscale_to_rgb(image)
  return _image_op("grayscale_to_rgb", key, _to_rgb)


register("to_rgb")(get_grayscale_to_rgb)


@register("rgb_to_grayscale")
def get_rgb_to_grayscale(key="image"):
  """Luma (ITU-R 601) of an RGB image, keeping dtype; shape [H, W, 1]."""
  def _to_gray(image):
    if image.shape[-1] == 1:
      return image
    # Same weights as tf.image.rgb_to_grayscale, but rounding to integers
    # (it truncates, e.g. pure green 255 -> 149).
    weights = tf.constant([0.2989, 0.5870, 0.1140], tf.float32)
    gray = tf.tensordot(tf.cast(image, tf.float32), weights, axes=[[-1], [0]])
    return _cast_like(gray[..., None], image.dtype)
  return _image_op("rgb_to_grayscale", key, _to_gray)
