"""Registry of preprocessing ops and the parser for op specs such as `resize(64)`.

A preprocessing string is a `|`-separated list of op specs, for example
`decode|resize(64)|value_range(-1, 1)|keep("image", "label")`. Each spec is the
name of a registered op factory, optionally called with Python *literal*
arguments. Arguments are parsed with `ast.literal_eval`, never `eval`, so a pp
string from a config file cannot run code.
"""
import ast
from typing import Any, Callable

from big_vision import config_parsing

# name -> factory. A factory takes the op's arguments and returns a function
# that maps an example dict to a new example dict.
_OPS: dict[str, Callable[..., Callable[[dict], dict]]] = {}


def register(name: str):
  """Decorator that registers an op factory under `name`."""
  if not name.isidentifier():
    raise ValueError(f"Op name {name!r} is not a valid Python identifier.")

  def _register(factory):
    if name in _OPS and _OPS[name] is not factory:
      raise ValueError(f"Preprocessing op {name!r} is already registered "
                       f"(by {_OPS[name].__module__}).")
    _OPS[name] = factory
    return factory

  return _register


def registered_ops() -> list[str]:
  """Sorted names of all registered ops."""
  return sorted(_OPS)


def lookup(name: str) -> Callable[..., Callable[[dict], dict]]:
  """Returns the factory registered under `name`."""
  if name not in _OPS:
    raise ValueError(f"Unknown preprocessing op {name!r}. Registered ops: "
                     f"{', '.join(registered_ops())}.")
  return _OPS[name]


def split_pp_string(pp_string: str) -> list[str]:
  """Splits at top-level `|`, i.e. not inside quotes or brackets."""
  specs = config_parsing.split_top_level(pp_string, sep="|")
  if any(not s for s in specs):
    raise ValueError(f"Empty op in preprocessing string {pp_string!r} "
                     "(look for a doubled or trailing '|').")
  return specs


def parse_op_spec(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """Parses `name` or `name(literal, ..., key=literal)` into (name, args, kw)."""
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"Cannot parse preprocessing op {spec!r}: {e.msg}.") from e

  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f"Preprocessing op {spec!r} must look like `name` or "
                     "`name(args)`.")

  def _literal(arg_node):
    if isinstance(arg_node, ast.Starred):
      raise ValueError(f"`*args` is not allowed in preprocessing op {spec!r}.")
    try:
      return ast.literal_eval(arg_node)
    except ValueError as e:
      raise ValueError(
          f"Argument `{ast.unparse(arg_node)}` of preprocessing op {spec!r} "
          "is not a Python literal (numbers, strings, tuples, lists, dicts, "
          "True/False/None are allowed).") from e

  args = tuple(_literal(a) for a in node.args)
  kwargs = {}
  for kw in node.keywords:
    if kw.arg is None:
      raise ValueError(f"`**kwargs` is not allowed in preprocessing op {spec!r}.")
    kwargs[kw.arg] = _literal(kw.value)
  return node.func.id, args, kwargs
