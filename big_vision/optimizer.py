"""AdamW with linear warmup and cosine decay, as the MAE/UMD recipes train.

lr = base lr x batch_size / lr_batch_scaling (256). Weight decay applies to weight
matrices only: biases, norms, embeddings, cls and mask tokens are not decayed.
Gradients are clipped by global norm first.
"""
import jax
import jax.numpy as jnp
import optax

# Parameter names never decayed (matched against any element of the path); "embedding"
# is the table of every nn.Embed (labels). The patch embedding is a linear map: decayed.
NO_DECAY = ("bias", "scale", "cls", "mask_token", "pos_embedding", "decoder_pos_embedding",
            "embedding")


def decay_mask(params):
  """True for parameters that get weight decay."""
  def decays(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    if any(n in NO_DECAY for n in names):
      return False
    return leaf.ndim >= 2  # Matrices only; vectors are biases and norm scales.
  return jax.tree_util.tree_map_with_path(decays, params)


def peak_lr(config):
  return config.lr * config.input.batch_size / config.get("lr_batch_scaling", 256)


def lr_schedule(config, total_steps, warmup_steps):
  # warmup_steps = 0 is no warmup: step 0 already trains at the peak (optax handles 0).
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr(config), warmup_steps=max(warmup_steps, 0),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def make(config, params, total_steps, warmup_steps):
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = lr_schedule(config, total_steps, warmup_steps)
  parts = []
  if config.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.optax.b1, b2=config.optax.b2,
                           weight_decay=config.wd, mask=decay_mask(params)))
  return optax.chain(*parts), schedule


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def ema_update(ema_params, params, decay):
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


