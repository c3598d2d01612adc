"""The UMD objective and its presets, checked against hand-computed losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision import diffusion as diffusion_lib
from big_vision import objective
from big_vision.models import masking as masking_lib


# A real schedule with few steps: the tests check the noised inputs against its closed form.
DIFFUSION = diffusion_lib.GaussianDiffusion.create("cosine", 100)


def make_fake_apply(calls, x0_err=1.0, eps_err=2.0, off_target=10.0):
  """A 'model' predicting x0 = truth + x0_err on masked pixels and eps = truth + eps_err on
  visible ones; elsewhere each error is `off_target` times larger, so that a loss reading
  the wrong pixels of either prediction shows.

  The objective calls it once per batch with one masking per branch (clean first), or
  once per branch; `calls` records each branch as a group: its images, t, masked-patch
  counts and size.
  """
  def apply(params, images, t, labels, *, masking, noised=None):
    del params, labels
    groups = (masking,) if isinstance(masking, masking_lib.Masking) else masking
    offset = sum(c["batch"] for c in calls)  # Where this call starts in the batch.
    start = 0
    for m in groups:
      b = m.mask.shape[0]
      calls.append(dict(images=np.asarray(images[start:start + b]),
                        t=np.asarray(t[start:start + b]), masked=np.asarray(m.mask).sum(1),
                        batch=b, noised=None if noised is None else np.asarray(
                            noised[start:start + b])))
      start += b
    assert start == images.shape[0]
    mask = jnp.concatenate([m.mask for m in groups])
    masked = masking_lib.mask_to_pixels(mask, (4, 4), 2)
    truth = lambda k: calls_truth[k][offset:offset + start]
    return dict(x0=truth("x0") + x0_err * (masked + off_target * (1 - masked)),
                eps=truth("eps") + eps_err * (1 - masked + off_target * masked), mask=mask)
  return apply


calls_truth = {}


def run(no_noise_prob, mask_ratio, mask_ratio_no_noise, b=8, one_call=True):
  images = jax.random.uniform(jax.random.PRNGKey(0), (b, 8, 8, 1), minval=-1, maxval=1)
  keys = jax.random.split(jax.random.PRNGKey(1), b)
  n_clean, n_noised = objective.split_sizes(b, no_noise_prob)
  # Recreate the noise the objective draws per example, to give the fake model targets.
  noise = jnp.stack([jax.random.normal(jax.random.split(k, 4)[2], (8, 8, 1))
                     for k in keys[n_clean:]]) if n_noised else jnp.zeros((0, 8, 8, 1))
  calls_truth.update(x0=images, eps=jnp.concatenate([jnp.zeros((n_clean, 8, 8, 1)), noise]))
  calls = []
  loss, metrics = objective.umd_loss(
      make_fake_apply(calls), None, images, None, keys, DIFFUSION,
      no_noise_prob=no_noise_prob, mask_ratio=mask_ratio,
      mask_ratio_no_noise=mask_ratio_no_noise, grid=(4, 4), patch_size=2, one_call=one_call)
  return float(loss), {k: float(v) for k, v in metrics.items()}, calls


def test_split_sizes():
  assert objective.split_sizes(128, 0.5) == (64, 64)
  assert objective.split_sizes(10, 0.1) == (1, 9)
  assert objective.split_sizes(8, 0.0) == (0, 8)
  assert objective.split_sizes(8, 1.0) == (8, 0)


def test_umd_split_losses_and_weights():
  loss, metrics, calls = run(no_noise_prob=0.25, mask_ratio=0.5, mask_ratio_no_noise=0.75)
  # Clean branch: x0 error 1 on masked pixels -> 1. Noised: mean(eps 2^2, x0 1^2) = 2.5.
  assert metrics["loss_clean"] == pytest.approx(1.0)
  assert metrics["loss_noised"] == pytest.approx(2.5)
  assert loss == pytest.approx(0.25 * 1.0 + 0.75 * 2.5)
  assert [c["batch"] for c in calls] == [2, 6]
  np.testing.assert_array_equal(calls[0]["masked"], 12)  # 75% of 16 patches.
  np.testing.assert_array_equal(calls[1]["masked"], 8)
  np.testing.assert_array_equal(calls[0]["t"], 0)  # Clean images are fed t = 0 ...
  assert calls[1]["t"].min() >= 1 and calls[1]["t"].max() <= 100  # ... noised t + 1.


@pytest.mark.parametrize("one_call", [True, False])
def test_model_sees_clean_images_and_q_samples(one_call):
  """Clean branch: x0 itself. Noised: sqrt(ab_t) x0 + sqrt(1 - ab_t) noise at the t fed."""
  loss, metrics, calls = run(no_noise_prob=0.25, mask_ratio=0.5, mask_ratio_no_noise=0.75,
                             one_call=one_call)
  x0, noise = np.asarray(calls_truth["x0"]), np.asarray(calls_truth["eps"][2:])
  np.testing.assert_array_equal(calls[0]["images"], x0[:2])
  # The objective's t per example, drawn again from the example keys.
  keys = jax.random.split(jax.random.PRNGKey(1), 8)[2:]
  t = np.array([int(jax.random.randint(jax.random.split(k, 4)[1], (), 0, 100)) for k in keys])
  np.testing.assert_array_equal(calls[1]["t"], t + 1)
  # Closed form from the schedule's betas, not from the diffusion module's q_sample.
  ab = np.cumprod(1.0 - diffusion_lib.get_betas("cosine", 100))[t][:, None, None, None]
  np.testing.assert_allclose(calls[1]["images"], np.sqrt(ab) * x0[2:] + np.sqrt(1 - ab) * noise,
                             rtol=1e-5, atol=1e-5)
  assert np.abs(calls[1]["images"] - x0[2:]).max() > 0.1  # Really noised.
  assert metrics["loss_noised"] == pytest.approx(2.5) and loss == pytest.approx(2.125)


def test_maskdm_is_eps_loss_on_visible_pixels_alone():
  images = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 1), minval=-1, maxval=1)
  keys = jax.random.split(jax.random.PRNGKey(1), 8)
  noise = jnp.stack([jax.random.normal(jax.random.split(k, 4)[2], (8, 8, 1)) for k in keys])
  calls_truth.update(x0=images, eps=noise)
  kw = dict(no_noise_prob=0.0, mask_ratio=0.5, mask_ratio_no_noise=0.75, grid=(4, 4),
            patch_size=2)
  loss, _ = objective.umd_loss(make_fake_apply([]), None, images, None, keys, DIFFUSION,
                               noised_x0_loss=False, **kw)
  assert float(loss) == pytest.approx(4.0)  # eps error 2 on visible pixels, nothing else.
  loss, _ = objective.umd_loss(make_fake_apply([]), None, images, None, keys, DIFFUSION, **kw)
  assert float(loss) == pytest.approx(2.5)  # MaskDiT: and x0 error 1 on masked pixels.


def test_diffmae_encodes_clean_images_and_denoises_masked_patches():
  """DiffMAE: the model gets the clean images and, as noised=, their q_sample at the t it
  is fed; the loss is the x0 error on masked pixels alone."""
  images = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 1), minval=-1, maxval=1)
  keys = jax.random.split(jax.random.PRNGKey(1), 8)
  noise = jnp.stack([jax.random.normal(jax.random.split(k, 4)[2], (8, 8, 1)) for k in keys])
  calls_truth.update(x0=images, eps=noise)
  calls = []
  kw = dict(mask_ratio=0.5, mask_ratio_no_noise=0.75, grid=(4, 4), patch_size=2,
            noised_queries=True)
  loss, metrics = objective.umd_loss(make_fake_apply(calls), None, images, None, keys,
                                     DIFFUSION, no_noise_prob=0.0, **kw)
  assert float(loss) == pytest.approx(1.0) and set(metrics) == {"loss", "loss_noised"}
  np.testing.assert_array_equal(calls[0]["images"], images)
  t = calls[0]["t"] - 1
  ab = np.cumprod(1.0 - diffusion_lib.get_betas("cosine", 100))[t][:, None, None, None]
  np.testing.assert_allclose(calls[0]["noised"],
                             np.sqrt(ab) * images + np.sqrt(1 - ab) * np.asarray(noise),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"no clean branch: no_noise_prob=0.5 must be 0"):
    objective.umd_loss(make_fake_apply([]), None, images, None, keys, DIFFUSION,
                       no_noise_prob=0.5, **kw)


def test_dit_preset_is_eps_loss_on_all_pixels():
  loss, metrics, calls = run(no_noise_prob=0.0, mask_ratio=0.0, mask_ratio_no_noise=0.75)
  assert loss == pytest.approx(4.0) and "loss_clean" not in metrics
  assert len(calls) == 1 and calls[0]["masked"].max() == 0


def test_mae_preset_is_clean_masked_x0_loss():
  loss, metrics, calls = run(no_noise_prob=1.0, mask_ratio=0.375, mask_ratio_no_noise=0.75)
  assert loss == pytest.approx(1.0) and "loss_noised" not in metrics
  assert len(calls) == 1 and calls[0]["masked"].min() == 12


def test_masked_mse_ignores_visible_pixels():
  out = dict(x0=jnp.zeros((1, 4, 4, 1)), mask=jnp.array([[1.0, 0.0, 0.0, 0.0]]))
  target = jnp.zeros((1, 4, 4, 1)).at[0, 2:, 2:].set(7.0)  # Error only in a visible patch.
  assert float(objective.clean_branch_loss(out, target, (2, 2), 2)) == 0.0
  target = jnp.zeros((1, 4, 4, 1)).at[0, :2, :2].set(3.0)  # Error in the masked patch.
  assert float(objective.clean_branch_loss(out, target, (2, 2), 2)) == pytest.approx(9.0)


def test_per_example_randomness_does_not_depend_on_batch_split():
  """The loss of a batch is the mean of the losses of its halves (same keys)."""
  from big_vision.models import ae
  model = ae.build_model(dict(variant="Mu/2", image_size=8, channels=1, num_classes=3))
  images = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 1), minval=-1, maxval=1)
  labels = jnp.arange(8) % 3
  # Jitted: the model run op by op (eager) costs far more than compiling it.
  params = jax.jit(model.init)({"params": jax.random.PRNGKey(1)}, images,
                               jnp.zeros(8, jnp.int32), labels)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
  keys = jax.random.split(jax.random.PRNGKey(2), 8)
  apply = jax.jit(lambda p, x, t, y, masking: model.apply({"params": p}, x, t, y,
                                                         masking=masking))
  kw = dict(diffusion=diffusion_lib.GaussianDiffusion.create("cosine", 100), no_noise_prob=0.0,
            mask_ratio=0.5, mask_ratio_no_noise=0.75, grid=model.grid, patch_size=2,
            label_dropout=0.5, null_label=3)
  full, _ = objective.umd_loss(apply, params, images, labels, keys, **kw)
  halves = [objective.umd_loss(apply, params, images[s], labels[s], keys[s], **kw)[0]
            for s in (slice(0, 4), slice(4, 8))]
  assert float(full) == pytest.approx(float(sum(halves) / 2), rel=1e-5)


def test_label_dropout_rate():
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  labels = jnp.arange(4000) % 10
  dropped = objective.drop_labels(labels, keys, 0.1, 10)
  assert abs(float((dropped == 10).mean()) - 0.1) < 0.02
  kept = dropped != 10
  np.testing.assert_array_equal(dropped[kept], labels[kept])  # The others are untouched.
  np.testing.assert_array_equal(objective.drop_labels(labels, keys, 0.0, 10), labels)
  assert objective.drop_labels(None, keys, 0.1, 10) is None


def test_one_model_call_equals_a_call_per_branch():
  """The speed path (both branches in one model call, one decoder pass) computes the same
  loss and gradients as the straightforward one (a model call per branch)."""
  from big_vision.models import ae
  model = ae.build_model(dict(variant="Mu/2", image_size=8, channels=1, num_classes=3))
  b = 8
  images = jax.random.uniform(jax.random.PRNGKey(0), (b, 8, 8, 1), minval=-1, maxval=1)
  labels = jnp.arange(b) % 3
  # Jitted: the model run op by op (eager) costs far more than compiling it.
  params = jax.jit(model.init)({"params": jax.random.PRNGKey(1)}, images,
                               jnp.zeros(b, jnp.int32), labels)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # Leave AdaLN-Zero's zeros.
  keys = jax.random.split(jax.random.PRNGKey(2), b)
  apply = jax.jit(lambda p, x, t, y, masking: model.apply({"params": p}, x, t, y,
                                                         masking=masking))
  calls, inputs = [], {True: [], False: []}

  def loss(p, one_call):
    def counted(p, x, *a, **k):
      calls.append(one_call)
      inputs[one_call].append(np.asarray(x))  # Not traced: only params are.
      return apply(p, x, *a, **k)
    return objective.umd_loss(
        counted, p, images, labels, keys, diffusion_lib.GaussianDiffusion.create("cosine", 100),
        no_noise_prob=0.25, mask_ratio=0.375, mask_ratio_no_noise=0.75, grid=model.grid,
        patch_size=2, label_dropout=0.5, null_label=3, one_call=one_call)[0]

  l1, g1 = jax.value_and_grad(loss)(params, True)
  l2, g2 = jax.value_and_grad(loss)(params, False)
  assert calls == [True, False, False]
  # Both paths feed the model the same images (clean, then q_sampled; see
  # test_model_sees_clean_images_and_q_samples for their values).
  np.testing.assert_array_equal(inputs[True][0], np.concatenate(inputs[False]))
  assert float(l1) == pytest.approx(float(l2), rel=1e-6)
  # Float32 sums in another order: differences far below the gradients' scale.
  scale = max(float(jnp.abs(c).max()) for c in jax.tree_util.tree_leaves(g2))
  for a, c in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * scale)
