"""Token masking: which patches the encoder sees.

Both strategies keep the same number of tokens in every image (static shapes for jit)
and return the kept tokens in their original order, the binary mask and the permutation
that restores the full sequence from [kept, masked].
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Masking(NamedTuple):
  ids_keep: jax.Array     # [B, K] int32, indices of the visible tokens, ascending.
  mask: jax.Array         # [B, N] float32, 1 = masked, 0 = visible.
  ids_restore: jax.Array  # [B, N] int32, gathers [kept..., masked...] back into order.


def check_mask_ratio(mask_ratio):
  if not 0.0 <= float(mask_ratio) < 1.0:
    raise ValueError(f"mask ratio {mask_ratio} is outside [0, 1): at least one token "
                     "must stay visible")


def num_kept(num_tokens, mask_ratio):
  """Tokens left visible: floor(N * (1 - ratio)), at least one."""
  check_mask_ratio(mask_ratio)
  # Round first so that e.g. 10 * (1 - 0.7) = 2.9999999999999996 counts as 3.
  return max(1, int(np.floor(round(num_tokens * (1.0 - mask_ratio), 6))))


def _masks_none(name, mask_ratio, count, unit, detail, fix):
  """The error for a non-zero ratio that masks no `unit`: the caller's masked-patch loss
  would silently be 0."""
  if count < 2:
    fix = f"one {unit} must stay visible, so none can be masked; use {name}=0 or {fix}"
  return ValueError(f"{name}={mask_ratio} masks none of the {count} {unit}s{detail}; {fix}")


def masked_tokens(num_tokens, mask_ratio, name="mask_ratio"):
  """Tokens random masking hides: N - num_kept. A non-zero ratio must hide one."""
  masked = num_tokens - num_kept(num_tokens, mask_ratio)
  if not masked and mask_ratio > 0:
    # Rounded down, so that it is not a hair above 1/N (which can mask two).
    raise _masks_none(name, mask_ratio, num_tokens, "token", "",
                      f"1/{num_tokens} = {math.floor(1e6 / num_tokens) / 1e6:g} masks one"
                      if num_tokens > 1 else "smaller patches")
  return masked


def masked_blocks(grid_hw, mask_ratio, block_size, name="mask_ratio"):
  """Blocks of block_size x block_size patches that block masking hides:
  floor(num_blocks * ratio). The block size must divide the patch grid, and a non-zero
  ratio must hide one block."""
  check_mask_ratio(mask_ratio)
  gh, gw = grid_hw
  if block_size < 1 or gh % block_size or gw % block_size:
    raise ValueError(f"mask_block_size={block_size} does not divide the patch grid "
                     f"{gh}x{gw}; use a divisor of both")
  bh, bw = gh // block_size, gw // block_size
  num_blocks = bh * bw
  masked = int(np.floor(round(num_blocks * mask_ratio, 6)))
  if not masked and mask_ratio > 0:
    smallest = math.ceil(1e6 / num_blocks) / 1e6  # Rounded up: still masks one block.
    raise _masks_none(name, mask_ratio, num_blocks, "block",
                      f" ({bh}x{bw} blocks of {block_size}x{block_size} patches)",
                      f"the smallest ratio that masks one block is 1/{num_blocks} = "
                      f"{smallest:g}" if num_blocks > 1 else "a smaller mask_block_size")
  return masked


def random_masking(rng, batch_size, num_tokens, mask_ratio):
  """Masks a uniformly random subset of exactly N - num_kept tokens in each image."""
  keep = num_tokens - masked_tokens(num_tokens, mask_ratio)
  if keep == num_tokens:  # mask_ratio = 0.
    return no_masking(batch_size, num_tokens)
  noise = jax.random.uniform(rng, (batch_size, num_tokens))
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  mask = (rank >= keep).astype(jnp.float32)
  order = jnp.argsort(mask, axis=1, stable=True).astype(jnp.int32)
  return Masking(order[:, :keep], mask, jnp.argsort(order, axis=1).astype(jnp.int32))


def block_masking(rng, batch_size, grid_hw, mask_ratio, block_size):
  """Masks whole blocks of block_size x block_size patches (MaskDM's strategy).

  The number of masked blocks is masked_blocks(...), so the kept count is the same for
  every image.
  """
  gh, gw = grid_hw
  masked = masked_blocks(grid_hw, mask_ratio, block_size)
  if not masked:  # mask_ratio = 0.
    return no_masking(batch_size, gh * gw)
  bh, bw = gh // block_size, gw // block_size
  num_blocks = bh * bw
  noise = jax.random.uniform(rng, (batch_size, num_blocks))
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  block_mask = (rank < masked).astype(jnp.float32).reshape(batch_size, bh, 1, bw, 1)
  mask = jnp.broadcast_to(block_mask, (batch_size, bh, block_size, bw, block_size))
  mask = mask.reshape(batch_size, gh * gw)
  keep = gh * gw - masked * block_size * block_size
  order = jnp.argsort(mask, axis=1, stable=True).astype(jnp.int32)
  return Masking(order[:, :keep], mask, jnp.argsort(order, axis=1).astype(jnp.int32))


def draw(rng, batch_size, grid_hw, mask_ratio, block_size=None):
  """Masks of a model's kind: whole block_size x block_size blocks of patches when
  block_size is given (MaskDM), else random patches."""
  if block_size:
    return block_masking(rng, batch_size, grid_hw, mask_ratio, block_size)
  return random_masking(rng, batch_size, grid_hw[0] * grid_hw[1], mask_ratio)


def per_example(keys, grid_hw, mask_ratio, block_size=None):
  """One mask per example key [B] (see draw): the batch's masks do not depend on how it
  is split."""
  one = lambda k: draw(k, 1, grid_hw, mask_ratio, block_size)
  return Masking(*(x[:, 0] for x in jax.vmap(one)(keys)))


def no_masking(batch_size, num_tokens):
  ids = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch_size, num_tokens))
  return Masking(ids, jnp.zeros((batch_size, num_tokens), jnp.float32), ids)


def gather_tokens(tokens, ids):
  """tokens [B, N, D], ids [B, K] -> [B, K, D]."""
  return jnp.take_along_axis(tokens, ids[..., None], axis=1)


def restore_tokens(kept, fill, ids_restore):
  """Puts kept tokens [B, K, D] back in place, `fill` [B, N-K, D] at masked positions."""
  return gather_tokens(jnp.concatenate([kept, fill], axis=1), ids_restore)


def masked_ids(masking):
  """[B, N - K] indices of the masked tokens, in the order restore_tokens' `fill` has."""
  order = jnp.argsort(masking.ids_restore, axis=1)  # [kept..., masked...] -> token index.
  return order[:, masking.ids_keep.shape[1]:].astype(jnp.int32)


def mask_to_pixels(mask, grid_hw, patch_size):
  """[B, N] token mask -> [B, H, W, 1] pixel mask."""
  gh, gw = grid_hw
  m = mask.reshape(mask.shape[0], gh, 1, gw, 1)
  m = jnp.broadcast_to(m, (mask.shape[0], gh, patch_size, gw, patch_size))
  return m.reshape(mask.shape[0], gh * patch_size, gw * patch_size, 1)
