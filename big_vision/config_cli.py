"""Command-line config loading: `--config FILE.py:ARGS` and `--config.a.b=value` overrides.

Same syntax as absl's config_flags, but every mistake (a bad option in the config
string, an unknown field, a value of the wrong type) ends the program with one line
naming the bad value, before anything is built or compiled.
"""
import ast
import importlib.util
import os
import sys

import ml_collections

from big_vision import config_parsing
from big_vision.config_parsing import ConfigError


def load_config_file(spec):
  """'configs/x.py:a=1,b=2' -> the ConfigDict returned by get_config('a=1,b=2')."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  # Config files import `configs.common`; make the repository root importable.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location("_config_module", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg) function")
  return module.get_config(arg or None)


def _convert_override(name, raw, current):
  if current is None:  # No type to follow: read a Python literal, else keep the string.
    try:
      return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
  if isinstance(current, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"--config.{name} is a section, not a value; set one of its fields: "
                      f"{', '.join(sorted(current.keys()))}")
  return config_parsing.convert(f"config.{name}", raw, current)


def apply_override(config, dotted, raw):
  """Sets config.<dotted> = raw converted to the field's current type."""
  *parents, leaf = dotted.split(".")
  node = config
  for depth, key in enumerate(parents):
    if key not in node:
      where = ".".join(parents[:depth]) or "config"
      raise ConfigError(f"unknown config field {dotted!r}: {where!r} has no field {key!r}; "
                        f"it has: {', '.join(sorted(node.keys()))}")
    node = node[key]
  if leaf not in node and len(parents) == 2 and parents[0] == "evals":
    # An evaluator's option that its config leaves at the default (e.g. reconstruction's
    # t): checked against the evaluator's arguments when the evals are built.
    with node.unlocked():
      node[leaf] = _convert_override(dotted, raw, None)
    return
  if leaf not in node:
    where = ".".join(parents) or "config"
    raise ConfigError(f"unknown config field {dotted!r}: {where!r} has no field {leaf!r}; "
                      f"it has: {', '.join(sorted(node.keys()))}")
  with node.ignore_type():
    node[leaf] = _convert_override(dotted, raw, node[leaf])


def split_argv(argv):
  """Pulls --config and --config.* out of argv. Returns (spec, overrides, rest)."""
  spec, overrides, rest = None, [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config") and (arg[8:9] in ("", "=", ".")):
      name, eq, value = arg[2:].partition("=")
      if not eq:
        if i + 1 >= len(args):
          raise ConfigError(f"{arg} needs a value")
        value, i = args[i + 1], i + 1
      if name == "config":
        spec = value
      else:
        overrides.append((name[len("config."):], value))
    else:
      rest.append(arg)
    i += 1
  return spec, overrides, rest


def load_from_argv(argv):
  """Returns (config, remaining argv). Raises ConfigError for any bad input."""
  spec, overrides, rest = split_argv(argv)
  if spec is None:
    raise ConfigError("missing --config FILE.py[:OPTIONS], e.g. --config configs/ae_fmnist.py")
  config = load_config_file(spec)
  for dotted, raw in overrides:
    apply_override(config, dotted, raw)
  return config, rest


def load_or_exit(argv, check=None):
  """load_from_argv + optional check(config); a ConfigError exits with one line."""
  try:
    config, rest = load_from_argv(argv)
    if check is not None:
      check(config)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  return config, rest
