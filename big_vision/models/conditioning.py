"""Conditioning inputs: diffusion time step and optional class label.

t = 0 means a clean image (no noise); noised images are fed t + 1, so the network can
tell "clean" from "slightly noised". The label table has one extra row, the null class,
used for unconditional inputs and classifier-free guidance.
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def sinusoidal_embedding(t, dim, max_period=10_000.0):
  """[B] (float or int) time steps -> [B, dim] sin/cos features (DiT/ADM convention)."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nn.Module):
  """Sinusoidal features of t followed by a two-layer MLP."""
  width: int
  freq_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    x = sinusoidal_embedding(t, self.freq_dim)
    init = nn.initializers.normal(0.02)
    x = nn.Dense(self.width, kernel_init=init, dtype=self.dtype, name="mlp_in")(x)
    x = nn.silu(x)
    return nn.Dense(self.width, kernel_init=init, dtype=self.dtype, name="mlp_out")(x)


class LabelEmbedder(nn.Module):
  """Class label embedding with a null class (index num_classes). Label dropout for
  classifier-free guidance is the objective's (objective.drop_labels), per example key."""
  num_classes: int
  width: int

  @nn.compact
  def __call__(self, labels):
    table = nn.Embed(self.num_classes + 1, self.width,
                     embedding_init=nn.initializers.normal(0.02), name="table")
    if labels is None:
      raise ValueError("labels are required for a class-conditional model; pass "
                       "null_labels(batch) for unconditional inputs")
    return table(jnp.asarray(labels, jnp.int32))
