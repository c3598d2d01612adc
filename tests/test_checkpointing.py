"""Parameters loaded from a checkpoint (init_from, eval_only): only what is asked for."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from big_vision import checkpointing


def test_load_params_reads_params_and_ema_but_not_the_optimizer(tmp_path, monkeypatch):
  params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
  ema = jax.tree_util.tree_map(lambda x: x + 1, params)
  state = {"step": jnp.int32(7), "params": params, "ema_params": ema,
           "opt_state": optax.adamw(1e-3).init(params)}
  saver = checkpointing.Checkpointer(str(tmp_path))
  saver.save(7, state, {"epoch": 0})
  saver.close()

  asked = []
  restore = ocp.PyTreeCheckpointer.restore

  def spy(self, directory, *args, **kwargs):
    asked.append(sorted(kwargs["args"].item))
    return restore(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)

  loaded, step = checkpointing.load_params(str(tmp_path))
  assert step == 7 and sorted(loaded) == ["ema_params", "params"]
  # The optimizer's moments (twice the parameters) are not read, so not replicated.
  assert asked == [["ema_params", "params"]]
  for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(
      {"ema_params": ema, "params": params})):
    np.testing.assert_array_equal(got, want)
    assert got.sharding.is_fully_replicated


def test_reading_a_checkpoint_warns_of_nothing(tmp_path, caplog):
  """Resuming and eval_only read checkpoints without orbax's warnings that say nothing
  wrong (a read-only manager's settings, the state item's own metadata file); others
  still pass."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  state = {"params": {"w": jnp.ones((2, 3))}}
  saver = checkpointing.Checkpointer(str(tmp_path))
  saver.save(3, state, {"step": 3})
  saver.wait()
  with caplog.at_level("WARNING"):
    assert saver.extra(3) == {"step": 3} and not saver.differences(3, state)
    assert checkpointing.load_params(str(tmp_path))[1] == 3
    absl_logging.warning("Metadata file does not exist: %s", "/x/3/_CHECKPOINT_METADATA")
  saver.close()
  assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
      "Metadata file does not exist: /x/3/_CHECKPOINT_METADATA"], caplog.text
