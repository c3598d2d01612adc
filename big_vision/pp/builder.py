"""Turns a preprocessing string into one function on example dicts."""
from typing import Callable

from big_vision.pp import ops_general  # pylint: disable=unused-import  (registers ops)
from big_vision.pp import ops_image  # pylint: disable=unused-import  (registers ops)
from big_vision.pp import registry


def get_preprocess_fn(pp_string: str | None) -> Callable[[dict], dict]:
  """Returns fn(example dict) -> example dict applying the ops of `pp_string`.

  Example: `get_preprocess_fn('decode|resize(64)|keep("image", "label")')`.
  All ops are looked up and constructed here, so a typo or a bad argument
  fails immediately rather than inside tf.data. An empty string or None is the
  identity.
  """
  if pp_string is None or not pp_string.strip():
    return lambda data: data

  ops = []
  for spec in registry.split_pp_string(pp_string):
    name, args, kwargs = registry.parse_op_spec(spec)
    factory = registry.lookup(name)
    try:
      ops.append(factory(*args, **kwargs))
    except TypeError as e:  # Wrong number or names of arguments.
      raise ValueError(f"Bad arguments in preprocessing op {spec!r}: {e}.") from e

  def _preprocess(data: dict) -> dict:
    if not isinstance(data, dict):
      raise TypeError(f"Preprocessing expects a dict of tensors, got "
                      f"{type(data).__name__}.")
    for op in ops:
      data = op(data)
    return data

  return _preprocess
