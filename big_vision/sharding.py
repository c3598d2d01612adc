"""Device mesh and shardings: the batch split over devices, parameters replicated or FSDP.

Fully sharded (FSDP, as big_vision does): each array is split along its largest dimension
that the mesh's data axis divides; arrays with no such dimension stay replicated.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_vision.config_parsing import ConfigError

STRATEGIES = ("replicated", "fully_sharded")


def make_mesh(devices=None):
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), ("data",))


def batch_sharding(mesh):
  return NamedSharding(mesh, P("data"))


def replicated(mesh):
  return NamedSharding(mesh, P())


def check_batch(batch_size, mesh):
  n = mesh.devices.size
  if batch_size % n or batch_size % jax.process_count():
    raise ConfigError(f"batch_size={batch_size} is not divisible by the {n} devices "
                      f"({jax.process_count()} processes); use a multiple of {n}")


def _fsdp_spec(shape, axis_size):
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % axis_size == 0 and shape[d] >= axis_size:
      spec = [None] * len(shape)
      spec[d] = "data"
      return P(*spec)
  return P()


def tree_shardings(abstract_tree, mesh, strategy):
  """NamedShardings for every array of a tree of ShapeDtypeStructs."""
  if strategy not in STRATEGIES:
    raise ConfigError(f"unknown sharding strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
  size = mesh.shape["data"]

  def one(x):
    if strategy == "replicated" or not getattr(x, "shape", ()):
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(x.shape, size))
  return jax.tree_util.tree_map(one, abstract_tree)
