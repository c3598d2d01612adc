"""The training step, apart from the trainer's loop: init of the state and the update.

`make_update` returns the pure function (state, batch) -> (state, metrics) that the
trainer (and the benchmark) jit with their shardings. It needs no input pipeline, so the
step can be built and timed on a machine without TensorFlow.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from big_vision import objective
from big_vision import optimizer as optimizer_lib
from big_vision.config_parsing import ConfigError


def make_apply(model):
  def apply(params, images, t, labels, *, mask_ratio=0.0, masking=None, noised=None,
            train=False, rngs=None):
    return model.apply({"params": params}, images, t, labels, mask_ratio=mask_ratio,
                       masking=masking, noised=noised, train=train, rngs=rngs)
  return apply


def make_init_params(model):
  """rng -> freshly initialised parameters."""
  h, w = model.image_size
  dummy = (jnp.zeros((2, h, w, model.channels)), jnp.zeros((2,), jnp.int32))

  def init(rng):
    rngs = dict(zip(("params", "mask", "dropout"), jax.random.split(rng, 3)))
    return model.init(rngs, *dummy, mask_ratio=0.0)["params"]
  return init


def make_init_state(config, init_params, tx):
  """rng -> the train state: params, optimizer state, step (and EMA params)."""
  def init_state(rng):
    params = init_params(rng)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
    if config.get("ema_decay"):
      state["ema_params"] = params
    return state
  return init_state


# fold_in(step key, _ROW_ORDER): the key of a step's row order, apart from the examples'.
_ROW_ORDER = 1 << 30


def row_order(step_key, batch_size):
  """The step's random order of the batch's rows; the first n_clean of it are clean."""
  return jax.random.permutation(jax.random.fold_in(step_key, _ROW_ORDER), batch_size)


def make_update(config, model, diffusion, tx, lr_fn, rng, batch_size, num_devices,
                data_sharding=None):
  """The training step (state, batch) -> (state, metrics), before jit.

  rng is the run's base key; each step folds in its step number, and each example gets
  its own key, so the step does not depend on sharding or micro-batching. The batch's
  rows are put in a random order first (and kept in `data_sharding`): the clean branch
  takes the first rows, and on several hosts the first rows are always process 0's
  shard of the data.
  """
  apply = make_apply(model)
  labels_on = bool(model.num_classes)
  use_ema = bool(config.get("ema_decay"))
  loss_fn = functools.partial(
      objective.umd_loss, apply, diffusion=diffusion,
      mask_ratio=config.mask_ratio, mask_ratio_no_noise=config.mask_ratio_no_noise,
      grid=model.grid, patch_size=model.patch_size,
      mask_block_size=model.block_mask_size,
      noised_x0_loss=config.get("noised_x0_loss", True),
      noised_queries=model.noised_queries,
      label_dropout=config.get("label_dropout", 0.1) if labels_on else 0.0,
      null_label=model.num_classes, one_call=config.get("one_model_call", True))
  accum = config.get("grad_accum_steps", 1)
  if batch_size % (accum * num_devices):
    raise ConfigError(f"batch_size={batch_size} is not divisible by grad_accum_steps={accum}"
                      f" x {num_devices} devices")
  # The whole batch's clean share, as without accumulation: its first n_clean examples.
  n_clean, n_noised = objective.split_sizes(batch_size, config.no_noise_prob)
  micro_size = batch_size // accum

  def grad_fn(n, params, images, labels, keys):
    """Loss gradients of a micro-batch whose first n examples are the clean ones."""
    p = n / images.shape[0]  # umd_loss takes its clean count as round(size * p) = n.
    assert objective.split_sizes(images.shape[0], p)[0] == n, (n, images.shape)
    return jax.value_and_grad(functools.partial(loss_fn, no_noise_prob=p), has_aux=True)(
        params, images, labels, keys)

  def gradients(params, images, labels, keys):
    """Loss gradients, averaged over `accum` micro-batches so a large batch fits.

    The same computation as the full batch: micro-batch i takes examples i, i + accum, ...
    (so each device keeps its share), hence the clean ones among the batch's first n_clean,
    ceil or floor of n_clean / accum of them; rounding per micro-batch would not add up.
    Each micro-batch's loss is its mean per-example loss, so equal weights 1 / accum give
    the batch's; the branch losses are weighted by each micro-batch's share of the branch.
    """
    if accum == 1:
      (_, metrics), grads = grad_fn(n_clean, params, images, labels, keys)
      return grads, metrics
    micro = lambda x: None if x is None else jnp.swapaxes(
        x.reshape((micro_size, accum) + x.shape[1:]), 0, 1)
    micro_batches = tuple(micro(x) for x in (images, labels, keys))
    # Micro-batches [0, r) hold one clean example more than those in [r, accum): two
    # scans, one per shape (one when accum divides n_clean).
    low, r = divmod(n_clean, accum)
    grads, metrics = None, {}
    for start, stop, n in ((0, r, low + 1), (r, accum, low)):
      if start == stop:
        continue
      part = jax.tree_util.tree_map(lambda x: x[start:stop], micro_batches)  # pylint: disable=cell-var-from-loop
      g, m = _accumulate(functools.partial(grad_fn, n), params, part, weights=dict(
          loss_clean=n / max(n_clean, 1), loss_noised=(micro_size - n) / max(n_noised, 1)))
      grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
      # A group may lack a branch (fewer clean images than micro-batches).
      metrics = {k: metrics.get(k, 0.0) + m.get(k, 0.0) for k in sorted({*metrics, *m})}
    return jax.tree_util.tree_map(lambda x: x / accum, grads), metrics

  def _accumulate(step_fn, params, micro_batches, weights):
    """Summed gradients and weighted metrics (loss: 1 / accum) over stacked micro-batches."""
    first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
    (_, metrics_shape), grads_shape = jax.eval_shape(step_fn, params, *first)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   (grads_shape, metrics_shape))

    def body(carry, inputs):
      (_, metrics), grads = step_fn(params, *inputs)
      metrics = {k: v * weights.get(k, 1.0 / accum) for k, v in metrics.items()}
      return jax.tree_util.tree_map(jnp.add, carry, (grads, metrics)), None
    return jax.lax.scan(body, zeros, micro_batches)[0]

  def update(state, batch):
    # One key per example: the loss does not depend on sharding or micro-batching.
    step_key = jax.random.fold_in(rng, state["step"])
    keys = jax.random.split(step_key, batch_size)
    order = row_order(step_key, batch_size)

    def shuffle(x):
      if x is None or data_sharding is None:
        return None if x is None else x[order]
      return jax.lax.with_sharding_constraint(x[order], data_sharding)
    labels = shuffle(batch["label"] if labels_on else None)
    grads, metrics = gradients(state["params"], shuffle(batch["image"]), labels, keys)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(params=params, opt_state=opt_state, step=state["step"] + 1)
    if use_ema:
      new["ema_params"] = optimizer_lib.ema_update(state["ema_params"], params,
                                                   config.ema_decay)
    metrics.update(lr=lr_fn(state["step"]), grad_norm=optimizer_lib.global_norm(grads))
    return new, metrics

  return update
