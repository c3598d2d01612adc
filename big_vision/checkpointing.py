"""Checkpoints with orbax: the whole train state plus a small JSON of bookkeeping.

Saving is collective across processes (orbax coordinates hosts); restoring takes the
target shardings from an abstract state, so a checkpoint can be restored on another
number of devices or processes.
"""
import os

from etils import epath
import jax
import orbax.checkpoint as ocp

from big_vision import fileio


# A local path made absolute; URLs such as gs://bucket/run stay as they are (orbax takes them).
_absolute = fileio.absolute


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
  run keeps them}, step), as host arrays.
  """
  path = _absolute(path)
  isdir = lambda p: epath.Path(p).is_dir()
  step = None
  if os.path.basename(path).isdigit() and isdir(path):
    path, step = os.path.dirname(path), int(os.path.basename(path))
  elif isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not isdir(path):
    raise FileNotFoundError(f"{path} is not a workdir or checkpoint directory")
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {path}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  state = restored.state
  return {k: state[k] for k in ("params", "ema_params") if k in state}, step


def merge_params(fresh, loaded):
  """Takes every loaded array whose path and shape match; keeps fresh ones otherwise.

  Returns (merged tree, list of the paths that kept their fresh initialisation), so that
  fine-tuning can add a label embedding to a self-supervised checkpoint.
  """
  flat_loaded = {jax.tree_util.keystr(k): v
                 for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  kept_fresh = []

  def pick(path, x):
    key = jax.tree_util.keystr(path)
    y = flat_loaded.get(key)
    if y is None or tuple(y.shape) != tuple(x.shape):
      kept_fresh.append(key)
      return x
    return jax.device_put(y, x.sharding).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(pick, fresh), kept_fresh
