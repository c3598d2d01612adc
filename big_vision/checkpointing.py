"""Checkpoints with orbax: the whole train state plus a small JSON of bookkeeping.

Saving is collective across processes (orbax coordinates hosts); restoring takes the
target shardings from an abstract state, so a checkpoint can be restored on another
number of devices or processes.
"""
import logging
import os

from absl import logging as absl_logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from big_vision import fileio


# A local path made absolute; URLs such as gs://bucket/run stay as they are (orbax takes them).
_absolute = fileio.absolute


class _HarmlessOrbaxWarnings(logging.Filter):
  """Drops orbax's warnings that every resume and every eval_only printed, and that say
  nothing wrong: the read-only manager's settings (load_params opens it read-only on
  purpose), and the missing metadata file of the state item's folder (the step's folder
  has it; _saved_tree reads the item's)."""

  def filter(self, record):
    text = record.getMessage()
    return not (text.startswith(("CheckpointManagerOptions.read_only=True",
                                 "Given directory is read only"))
                or (text.startswith("Metadata file does not exist")
                    and text.endswith("/state/_CHECKPOINT_METADATA")))


absl_logging.get_absl_logger().addFilter(_HarmlessOrbaxWarnings())


class Checkpointer:
  """Saves to and restores from DIR/checkpoints/<step>/."""

  def __init__(self, workdir, max_to_keep=2):
    self.directory = os.path.join(_absolute(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state, extra):
    """Starts an asynchronous save; `extra` is a JSON-able dict (data position, ...)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)

  def restore(self, step, abstract_state):
    """Restores (state, extra); abstract_state holds ShapeDtypeStructs with shardings."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
    return restored.state, restored.extra

  def differences(self, step, abstract_state):
    """What the checkpoint of `step` holds unlike `abstract_state` (paths missing on one
    side or of another shape): a run of another model, EMA or optimizer cannot resume it."""
    saved = _shapes(_saved_tree(epath.Path(self.directory) / str(step) / "state"))
    now = _shapes(abstract_state)
    return [f"{'/'.join(k)}: {saved.get(k)} saved, {now.get(k)} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]

  def extra(self, step):
    """The bookkeeping JSON saved with `step`, without reading the state."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        extra=ocp.args.JsonRestore()))
    return restored.extra

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def load_params(path):
  """Parameters of a finished or running run: a workdir, its checkpoints folder, or one
  step's folder (DIR/checkpoints/1000). Returns ({"params": ..., and "ema_params" when the
  run keeps them}, step), replicated over this run's devices: the checkpoint may come from
  any number of devices or processes, sharded or not.
  """
  path = _absolute(path)
  isdir = lambda p: epath.Path(p).is_dir()
  step = None
  parent = os.path.dirname(path)
  if (os.path.basename(path).isdigit() and os.path.basename(parent) == "checkpoints"
      and isdir(path)):  # A step's folder; a workdir may be named 20240601 too.
    path, step = parent, int(os.path.basename(path))
  elif isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not isdir(path):
    raise FileNotFoundError(f"{path} is not a workdir or checkpoint directory")
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  manager.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {path}")
  # The saved shardings name the saving run's devices: restore onto ours, replicated.
  state_dir = epath.Path(path) / str(step) / "state"  # Save()'s Composite item "state".
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)), jax.sharding.PartitionSpec())
  saved = _saved_tree(state_dir)
  # Only the parameters are read: the optimizer's moments, twice the parameters' size,
  # would be replicated on every device for nothing.
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
      {k: saved[k] for k in ("params", "ema_params") if k in saved})
  with ocp.PyTreeCheckpointer() as checkpointer:
    params = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return params, step


def _saved_tree(state_dir):
  """The saved train state's tree of array metadata (shape, dtype), read without data."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.metadata(state_dir).item_metadata


def _shapes(tree):
  """{path as names: shape}; dict keys, sequence indices and fields alike, so that a
  restored metadata tree and the live state (namedtuple optimizer states) compare."""
  name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {tuple(map(name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unstacked(flat):
  """{keystr: array} with a scanned stack's blocks (['blocks'], depth first) as the
  ['block_NN'] entries of an unrolled model, so that either layout loads into the other."""
  out = {}
  for key, value in flat.items():
    if "['blocks']" in key:
      for i in range(value.shape[0]):
        out[key.replace("['blocks']", f"['block_{i:02d}']", 1)] = value[i]
    else:
      out[key] = value
  return out


def merge_params(fresh, loaded):
  """Takes every loaded array whose path and shape match (scanned or unrolled blocks
  alike); keeps fresh ones otherwise.

  Returns (merged tree, paths that kept their fresh initialisation, loaded arrays that
  fit nowhere), so that fine-tuning can add a label embedding to a self-supervised
  checkpoint, and a checkpoint of another model is not silently half-loaded.
  """
  flat_loaded = _unstacked({jax.tree_util.keystr(k): v
                            for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]})
  used, kept_fresh = set(), []

  def lookup(key, shape):
    y = flat_loaded.get(key)
    if y is None or tuple(y.shape) != tuple(shape):
      return None
    used.add(key)
    return y

  def pick(path, x):
    key = jax.tree_util.keystr(path)
    if "['blocks']" in key:  # This model scans its blocks: stack the loaded ones.
      parts = [lookup(key.replace("['blocks']", f"['block_{i:02d}']", 1), x.shape[1:])
               for i in range(x.shape[0])]
      y = None if any(p is None for p in parts) else jax.numpy.stack(parts)
    else:
      y = lookup(key, x.shape)
    if y is None:
      kept_fresh.append(key)
      return x
    return jax.device_put(y, x.sharding).astype(x.dtype)
  merged = jax.tree_util.tree_map_with_path(pick, fresh)
  unused = [f"{k} {tuple(v.shape)}" for k, v in flat_loaded.items() if k not in used]
  return merged, kept_fresh, unused
