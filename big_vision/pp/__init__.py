"""big_vision-style preprocessing: strings of registered ops, e.g.

`decode|resize(64)|value_range(-1, 1)|keep("image", "label")`.

Use `get_preprocess_fn(pp_string)`; see `registry.py` for the syntax,
`ops_image.py` / `ops_general.py` for the ops and `rng.py` for randomness.
"""
from big_vision.pp.builder import get_preprocess_fn
from big_vision.pp.registry import register, registered_ops

__all__ = ["get_preprocess_fn", "register", "registered_ops"]
