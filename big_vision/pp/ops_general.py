"""Preprocessing ops that manage keys and labels (not image specific)."""
import tensorflow as tf

from big_vision.pp.registry import register


def _check_keys(op: str, data: dict, keys) -> None:
  missing = [k for k in keys if k not in data]
  if missing:
    raise KeyError(f"{op}: example has no key(s) {missing}; it has "
                   f"{sorted(data)}.")


@register("keep")
def get_keep(*keys):
  """Keeps only `keys`; a key that is missing is an error (likely a typo)."""
  def _keep(data):
    _check_keys("keep", data, keys)
    return {k: data[k] for k in keys}
  return _keep


@register("drop")
def get_drop(*keys):
  """Removes `keys`; a key that is missing is an error (likely a typo)."""
  def _drop(data):
    _check_keys("drop", data, keys)
    return {k: v for k, v in data.items() if k not in keys}
  return _drop


@register("copy")
def get_copy(inkey, outkey):
  """Copies `data[inkey]` to `data[outkey]`."""
  def _copy(data):
    _check_keys("copy", data, [inkey])
    return {**data, outkey: data[inkey]}
  return _copy


@register("rename")
def get_rename(inkey, outkey):
  """Moves `data[inkey]` to `data[outkey]`."""
  def _rename(data):
    _check_keys("rename", data, [inkey])
    out = {k: v for k, v in data.items() if k != inkey}
    out[outkey] = data[inkey]
    return out
  return _rename


@register("onehot")
def get_onehot(depth, key="label", key_result=None, multi=True, on=1.0,
               off=0.0):
  """One-hot encodes integer labels as float32 of shape [depth].

  A vector of labels (with `multi=True`) becomes a multi-hot vector; a label
  outside [0, depth) gives an all-`off` vector, as `tf.one_hot` does.
  """
  if not isinstance(depth, int) or depth <= 0:
    raise ValueError(f"onehot: depth={depth!r} must be a positive int.")

  def _onehot(data):
    _check_keys("onehot", data, [key])
    labels = tf.cast(data[key], tf.int32)
    if labels.shape.rank == 0 or not multi:
      x = tf.one_hot(labels, depth, on_value=on, off_value=off)
    else:
      # Sum + clip (not max) so that an empty label list gives all `off`.
      x = tf.reduce_sum(tf.one_hot(labels, depth), axis=0)
      x = tf.clip_by_value(x, 0.0, 1.0)
      x = off + x * (on - off)
    return {**data, key_result or key: x}
  return _onehot
