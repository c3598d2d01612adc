"""Masking invariants: exact kept counts, restore is the inverse, whole blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision.models import masking


@pytest.mark.parametrize("n,ratio,keep", [(49, 0.75, 12), (256, 0.375, 160), (10, 0.7, 3),
                                          (64, 0.0, 64), (16, 0.99, 1)])
def test_num_kept(n, ratio, keep):
  assert masking.num_kept(n, ratio) == keep


@pytest.mark.parametrize("ratio", [1.0, -0.2, 1.5])
def test_bad_ratio_is_clear(ratio):
  with pytest.raises(ValueError, match=rf"mask ratio {ratio} is outside \[0, 1\)"):
    masking.num_kept(16, ratio)


@pytest.mark.parametrize("ratio", [0.0, 0.375, 0.75])
def test_random_masking_invariants(ratio):
  b, n, d = 8, 64, 5
  m = masking.random_masking(jax.random.PRNGKey(0), b, n, ratio)
  keep = masking.num_kept(n, ratio)
  assert m.ids_keep.shape == (b, keep)
  np.testing.assert_array_equal(m.mask.sum(1), n - keep)
  # Kept ids are exactly the unmasked positions, ascending.
  for i in range(b):
    np.testing.assert_array_equal(np.asarray(m.ids_keep[i]), np.where(m.mask[i] == 0)[0])
  # Restoring [kept, masked] gives back the original sequence.
  tokens = jax.random.normal(jax.random.PRNGKey(1), (b, n, d))
  kept = masking.gather_tokens(tokens, m.ids_keep)
  order = jnp.argsort(m.mask, axis=1, stable=True)
  masked = masking.gather_tokens(tokens, order[:, keep:])
  np.testing.assert_allclose(masking.restore_tokens(kept, masked, m.ids_restore), tokens)


def test_random_masking_differs_across_images_and_is_uniform():
  m = masking.random_masking(jax.random.PRNGKey(0), 4000, 16, 0.5)
  assert not np.array_equal(m.mask[0], m.mask[1])
  freq = np.asarray(m.mask).mean(0)
  np.testing.assert_allclose(freq, 0.5, atol=0.04)


def test_block_masking_covers_whole_blocks():
  b, grid, k = 6, (8, 8), 4
  m = masking.block_masking(jax.random.PRNGKey(3), b, grid, 0.5, k)
  mask = np.asarray(m.mask).reshape(b, 2, k, 2, k)
  # Every block is all-masked or all-visible.
  per_block = mask.transpose(0, 1, 3, 2, 4).reshape(b, 4, k * k)
  assert np.all((per_block.min(-1) == per_block.max(-1)))
  np.testing.assert_array_equal(per_block[..., 0].sum(1), 2)
  assert m.ids_keep.shape == (b, 32)
  tokens = jnp.arange(b * 64, dtype=jnp.float32).reshape(b, 64, 1)
  kept = masking.gather_tokens(tokens, m.ids_keep)
  order = jnp.argsort(m.mask, axis=1, stable=True)
  np.testing.assert_array_equal(
      masking.restore_tokens(kept, masking.gather_tokens(tokens, order[:, 32:]), m.ids_restore),
      tokens)


def test_block_masking_rejects_indivisible_grid():
  with pytest.raises(ValueError,
                     match="mask_block_size=3 does not divide the patch grid 8x8; use a divisor"):
    masking.block_masking(jax.random.PRNGKey(0), 2, (8, 8), 0.5, 3)


@pytest.mark.parametrize("ratio,blocks,smallest", [(0.2, 4, "1/4 = 0.25"),
                                                    (0.3, 3, "1/3 = 0.333334")])
def test_block_masking_rejects_ratio_that_masks_no_block(ratio, blocks, smallest):
  grid = (8, 8) if blocks == 4 else (4, 12)
  with pytest.raises(ValueError, match=rf"mask_ratio={ratio} masks none of the {blocks} blocks"
                                       rf".*smallest ratio that masks one block is {smallest}"):
    masking.block_masking(jax.random.PRNGKey(0), 2, grid, ratio, 4)
  # The ratio it names does mask one block; zero still means no masking.
  value = float(smallest.split("= ")[1])
  m = masking.block_masking(jax.random.PRNGKey(0), 2, grid, value, 4)
  np.testing.assert_array_equal(m.mask.sum(1), 16)
  np.testing.assert_array_equal(masking.block_masking(jax.random.PRNGKey(0), 2, grid, 0.0, 4)
                                .mask, 0)


def test_mask_to_pixels():
  mask = jnp.array([[1.0, 0.0, 0.0, 1.0]])
  px = masking.mask_to_pixels(mask, (2, 2), 3)
  assert px.shape == (1, 6, 6, 1)
  assert px[0, :3, :3].min() == 1 and px[0, :3, 3:].max() == 0 and px[0, 3:, 3:].min() == 1


@pytest.mark.parametrize("n,ratio,match", [
    (1, 0.5, r"mask_ratio=0.5 masks none of the 1 tokens; one token must stay visible, so "
             r"none can be masked; use mask_ratio=0 or smaller patches"),
    (49, 1e-9, r"mask_ratio=1e-09 masks none of the 49 tokens; 1/49 = 0.020408 masks one"),
])
def test_random_masking_rejects_ratio_that_masks_no_token(n, ratio, match):
  # As block masking: else the masked-patch loss is silently 0.
  with pytest.raises(ValueError, match=rf"^{match}$"):
    masking.random_masking(jax.random.PRNGKey(0), 2, n, ratio)
  if n > 1:  # The ratio it names masks one token.
    np.testing.assert_array_equal(
        masking.random_masking(jax.random.PRNGKey(0), 2, n, 0.020408).mask.sum(1), 1)
  # Zero still means no masking, also of a single token.
  np.testing.assert_array_equal(masking.random_masking(jax.random.PRNGKey(0), 2, n, 0.0).mask,
                                0)
  assert masking.masked_tokens(n, 0.0) == 0
