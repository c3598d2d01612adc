"""Typed parsing of the config string after the colon: `cfg.py:variant=B/4,size=64`.

A config declares its options and their defaults; `parse_arg` turns the string into a
ConfigDict whose values have the type of the default (int, float, bool, str or tuple).
Mistakes fail here, in one line, naming the option and what is allowed.
"""
import ast

import ml_collections
import numpy as np


class ConfigError(ValueError):
  """A config string or config value that cannot be used; the message says why."""


def is_int(value):
  """An int (numpy's too) and not a bool, which Python counts as an int."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name, value, low, why=""):
  """ConfigError naming the option unless value is an int >= low (why: what needs that)."""
  if not (is_int(value) and value >= low):
    raise ConfigError(f"{name}={value!r} must be an int >= {low}{why}")


def split_top_level(text, sep=","):
  """Splits on `sep` outside of brackets and quotes: 'a=(1,2),b=3' -> ['a=(1,2)', 'b=3'].

  Parts are stripped; empty parts are kept (callers decide whether they are an error).
  """
  parts, depth, quote, current = [], 0, None, []
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "\"'":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == sep and depth == 0:
      parts.append("".join(current))
      current = []
      continue
    current.append(ch)
  parts.append("".join(current))
  return [p.strip() for p in parts]


def _strip_quotes(text):
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
    return text[1:-1]
  return text


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def convert(key, raw, default):
  """Converts the string `raw` to the type of `default`, or raises ConfigError."""
  kind = type(default)
  try:
    if kind is bool:
      low = raw.strip().lower()
      if low in _TRUE:
        return True
      if low in _FALSE:
        return False
      raise ValueError
    if kind is int:
      return int(raw)
    if kind is float:
      return float(raw)
    if kind is str:
      return _strip_quotes(raw.strip())
    if kind in (tuple, list):
      text = raw.strip()
      if not text.startswith(("(", "[")):
        text = f"({text},)"
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        raise ValueError
      if default:  # Elements take the type of the default's first element.
        value = tuple(convert(key, str(v), default[0]) for v in value)
      return tuple(value)
  except (ValueError, SyntaxError):
    pass
  raise ConfigError(
      f"config option {key!r} expects {_article(kind.__name__)} {kind.__name__} (default "
      f"{default!r}), got {raw!r}")


def _article(word):
  return "an" if word[:1] in "aeiou" else "a"


def _item_value(key, sep, raw, default):
  """The typed value of one `key=raw` item; a bare key (no `=`) is True for a bool."""
  if not sep:
    if not isinstance(default, bool):
      raise ConfigError(f"config option {key!r} needs a value: {key}=...")
    raw = "True"
  return convert(key, raw, default)


def parse_arg(arg, **defaults):
  """Parses `k1=v1,k2=v2` into a ConfigDict of `defaults` updated with typed values.

  A bare key (`scan`) sets a bool option to True. Keys not in `defaults` are an error
  that lists the known ones. A key given twice takes its last value.
  """
  result = dict(defaults)
  for item in filter(None, split_top_level(arg or "")):
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f"unknown config option {key!r}; known options: {', '.join(sorted(defaults))}")
    result[key] = _item_value(key, sep, raw, defaults[key])
  return ml_collections.ConfigDict(result)


def peek(arg, key, default):
  """The value of one option, typed like `default`, without checking the others (for
  presets that change the other options' defaults). Reads it as parse_arg will: a bare
  key is True for a bool option, and the last of repeated keys wins."""
  value = default
  for item in filter(None, split_top_level(arg or "")):
    k, sep, raw = item.partition("=")
    if k.strip() == key:
      value = _item_value(key, sep, raw, default)
  return value
