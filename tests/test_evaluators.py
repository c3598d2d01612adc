"""Evaluators on tiny models and data, the probe's math on synthetic features, eval_only."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from big_vision import config_cli
from big_vision import diffusion as diffusion_lib
from big_vision import objective
from big_vision import sharding
from big_vision import train
from big_vision.config_parsing import ConfigError
from big_vision.evaluators import common
from big_vision.evaluators import fid_math
from big_vision.evaluators import fid_scorer
from big_vision.evaluators import linear_probe
from big_vision.models import ae
from big_vision.models import masking as masking_lib
from big_vision.tools import eval_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_probe_separable_features_near_perfect():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(10, 32)) * 5
  y = rng.integers(0, 10, 3000)
  x = centres[y] + rng.normal(size=(3000, 32))
  res = linear_probe.few_shot(x[:2000], y[:2000], x[2000:], y[2000:], shots=(1, 10), seeds=2)
  assert res[10][0] > 0.97 and res[1][0] > 0.85


def test_probe_random_features_near_chance():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(3000, 64)), rng.integers(0, 10, 3000)
  res = linear_probe.few_shot(x[:2000], y[:2000], x[2000:], y[2000:], shots=(10, 25), seeds=3)
  for k in (10, 25):
    assert abs(res[k][0] - 0.1) < 0.04, res[k]


def test_probe_ridge_is_chosen_on_train_holdout_not_test():
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(3, 8)) * 3
  y = rng.integers(0, 3, 600)
  x = centres[y] + rng.normal(size=(600, 8))
  # Permuting the test labels must not change the chosen ridge strengths.
  a = linear_probe.few_shot(x[:400], y[:400], x[400:], y[400:], shots=(5,), seeds=2)
  b = linear_probe.few_shot(x[:400], y[:400], x[400:], rng.permutation(y[400:]), shots=(5,),
                            seeds=2)
  assert a[5][3] == b[5][3] and a[5][0] > b[5][0] + 0.3


def test_probe_fit_matches_lstsq():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(50, 5)), rng.integers(0, 3, 50)
  w, mean = linear_probe.fit(x, y, 3, l2=1e-9)
  xc = np.concatenate([x - x.mean(0), np.ones((50, 1))], 1)
  ref = np.linalg.lstsq(xc, 2 * np.eye(3)[y] - 1, rcond=None)[0]
  np.testing.assert_allclose(w, ref, atol=1e-6)
  w_dual, _ = linear_probe.fit(x[:4], y[:4], 3, l2=0.5)  # n < d: the dual form.
  xc4 = np.concatenate([x[:4] - x[:4].mean(0), np.ones((4, 1))], 1)
  primal = np.linalg.solve(xc4.T @ xc4 + 0.5 * np.eye(6), xc4.T @ (2 * np.eye(3)[y[:4]] - 1))
  np.testing.assert_allclose(w_dual, primal, atol=1e-8)


def make_context(data_dir, workdir, arg="variant=Mu/4"):
  config, _ = config_cli.load_from_argv(
      [f"--config=configs/ae_fmnist.py:{arg},wandb_mode=disabled"])
  config.input.data.data_dir = data_dir
  model = ae.build_model(config.model)
  mesh = sharding.make_mesh()
  diffusion = diffusion_lib.GaussianDiffusion.create(config.diffusion.schedule,
                                                     config.diffusion.timesteps)
  ctx = common.Context(model=model, diffusion=diffusion, config=config, workdir=workdir,
                       mesh=mesh, data_sharding=sharding.batch_sharding(mesh))
  x = jnp.zeros((2, 28, 28, 1))
  params = model.init({"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)}, x,
                      jnp.zeros(2, jnp.int32))["params"]
  # AdaLN-Zero makes a fresh encoder ignore its input; perturb it into a random one.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return ctx, params


def test_fewshot_evaluator_pixels_and_representation(data_dir, tmp_path):
  from big_vision.evaluators import fewshot
  ctx, params = make_context(data_dir, str(tmp_path))
  kw = dict(train_split="train[:600]", test_split="test[:300]", shots=(1, 10), seeds=2,
            holdout_per_class=10)
  pixel_probe = fewshot.Evaluator(ctx, features="pixels", **kw)
  pixels = dict(pixel_probe.run(params, 0))
  assert set(pixels) == {"1shot", "1shot_std", "10shot", "10shot_std"}
  assert pixels["10shot"] > 0.5  # Fashion-MNIST pixels are far better than chance.
  pixel_probe._featurize = None  # Computed once: later evals reuse the results.
  assert dict(pixel_probe.run(None, 1)) == pixels
  rep = dict(fewshot.Evaluator(ctx, features="representation", **kw).run(params, 0))
  noised = dict(fewshot.Evaluator(ctx, features="noised", t=50, **kw).run(params, 0))
  for r in (rep, noised):
    assert 0.0 <= r["10shot"] <= 1.0 and r["10shot"] > 0.15  # Random ViT features beat chance.


def test_fewshot_noises_train_and_test_differently(data_dir, tmp_path):
  from big_vision.evaluators import fewshot
  ctx, params = make_context(data_dir, str(tmp_path))
  ev = fewshot.Evaluator(ctx, features="noised", t=50, train_split="train[:64]",
                         test_split="test[:64]", batch_size=32, shots=(1,), seeds=1,
                         holdout_per_class=1)
  keys, featurize = [], ev._featurize

  def recording(p, images, key):
    keys.append(np.asarray(jax.random.key_data(key)).tobytes())
    return featurize(p, images, key)
  ev._featurize = recording
  list(ev.run(params, 0))
  assert len(keys) == 4  # Two batches each of train and test, all noised differently.
  assert len(set(keys)) == 4


def test_diffusion_loss_evaluator_deterministic_and_by_t(data_dir, tmp_path):
  from big_vision.evaluators import diffusion_loss
  ctx, params = make_context(data_dir, str(tmp_path))
  ev = diffusion_loss.Evaluator(ctx, num_ranges=2, split="test[:64]", batch_size=32)
  a, b = dict(ev.run(params, 0)), dict(ev.run(params, 0))
  assert a == b
  assert set(a) == {"loss", "loss_clean", "loss_noised", "loss_t0-500", "loss_t500-1000"}
  p = ctx.config.no_noise_prob
  assert a["loss"] == pytest.approx(p * a["loss_clean"] + (1 - p) * a["loss_noised"])
  # A random model predicts small values: the eps loss is about E[eps^2] = 1.
  assert 0.5 < a["loss_t0-500"] < 2.0
  ctx_dit, params_dit = make_context(data_dir, str(tmp_path), "variant=Mu/4,method=dit")
  dit = dict(diffusion_loss.Evaluator(ctx_dit, split="test[:32]").run(params_dit, 0))
  assert "loss_clean" not in dit and dit["loss"] == pytest.approx(dit["loss_noised"])



def test_diffusion_loss_conditioned_model_scores_true_labels(data_dir, tmp_path):
  """`loss` is the training objective with each image's label (no dropout); `loss_uncond`
  the same with the null label: both match a direct computation on the same draws."""
  from big_vision.evaluators import diffusion_loss
  ctx, params = make_context(data_dir, str(tmp_path), "variant=Mu/4,use_labels=True")
  model, diffusion, cfg = ctx.model, ctx.diffusion, ctx.config
  assert model.num_classes == 10
  ev = diffusion_loss.Evaluator(ctx, num_ranges=2, split="test[:32]", batch_size=32)
  got = dict(ev.run(params, 0))
  batch = next(common.iterate(ctx, ev.input_cfg))
  images, labels = batch["image"], batch["label"]
  assert len(set(np.asarray(labels).tolist())) > 1  # Real labels, not one class.

  def direct(labels):  # The evaluator's draws for batch 0: key PRNGKey(0), split as it does.
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    out = model.apply({"params": params}, images, jnp.zeros(32, jnp.int32), labels,
                      mask_ratio=cfg.mask_ratio_no_noise,
                      rngs={"mask": keys[0], "dropout": keys[0]})
    clean = objective.clean_branch_loss(out, images, model.grid, model.patch_size)
    k_t, k_eps, k_mask = jax.random.split(keys[1], 3)
    t = jax.random.randint(k_t, (32,), 0, diffusion.num_timesteps)
    noise = jax.random.normal(k_eps, images.shape)
    out = model.apply({"params": params}, diffusion.q_sample(images, t, noise), t + 1, labels,
                      mask_ratio=cfg.mask_ratio, rngs={"mask": k_mask, "dropout": k_mask})
    noised = objective.noised_branch_loss(out, images, noise, model.grid, model.patch_size)
    p = cfg.no_noise_prob
    return float(p * clean + (1 - p) * noised)

  assert got["loss"] == pytest.approx(direct(labels), rel=1e-5)
  assert got["loss_uncond"] == pytest.approx(direct(None), rel=1e-5)
  assert abs(got["loss"] - got["loss_uncond"]) > 1e-4  # The labels do change the loss.

def test_diffmae_evaluators(data_dir, tmp_path):
  """DiffMAE through the evaluators: the validation loss is the x0 error on masked pixels
  (with a zero head it predicts 0: about the images' mean square, where UMD's eps loss
  on visible pixels would add about 1); reconstruction and inpainting run; no samples."""
  from big_vision import input_pipeline
  from big_vision.evaluators import diffusion_loss, inpainting, reconstruction, sampling
  ctx, params = make_context(data_dir, str(tmp_path), "variant=Mu/4,method=diffmae")
  params = dict(params, head=jax.tree_util.tree_map(jnp.zeros_like, params["head"]))
  val = dict(diffusion_loss.Evaluator(ctx, num_ranges=2, split="test[:64]",
                                      batch_size=32).run(params, 0))
  builder = input_pipeline.get_dataset_builder("fashion_mnist_local", data_dir)
  pixels = np.stack([ex["image"] for ex in
                     builder.as_dataset(split="test[:64]").as_numpy_iterator()])
  mean_square = float(np.mean((pixels / 127.5 - 1.0) ** 2))
  assert val["loss"] == val["loss_noised"] == pytest.approx(mean_square, rel=0.05)
  r = dict(reconstruction.Evaluator(ctx, split="test[:16]", batch_size=16).run(params, 1))
  assert np.isfinite(r["masked_mse"])
  r = dict(inpainting.Evaluator(ctx, max_examples=8, batch_size=8, sampling_timesteps=2,
                                split="test[:8]").run(params, 1))
  assert set(r) == {"masked_mse", "masked_psnr", "onestep_masked_mse", "onestep_masked_psnr"}
  assert all(np.isfinite(v) for v in r.values())
  with pytest.raises(ValueError, match=r"DiffMAE .* use the inpainting eval|evaluate it with"):
    sampling.Evaluator(ctx, num_samples=4, batch_size=4)


class _PerfectDiffMAE:
  """Stands for a DiffMAE model: x0 is the clean images (the encoder's input, which a real
  model sees only at visible patches) when it is asked as trained: noised queries that
  are not the clean images, t + 1 in [1, T]. Otherwise, or at visible pixels, off by 10."""
  noised_queries, num_classes, block_mask_size = True, 0, None
  grid, patch_size, num_timesteps = (7, 7), 4, 1000

  def apply(self, variables, images, t, labels=None, *, mask_ratio=0.0, masking=None,
            noised=None, rngs=None):
    del variables, labels
    if masking is None:
      masking = masking_lib.draw(rngs["mask"], images.shape[0], self.grid, mask_ratio)
    masked = masking_lib.mask_to_pixels(masking.mask, self.grid, self.patch_size)
    as_trained = (jnp.all((t >= 1) & (t <= self.num_timesteps))
                  & jnp.any(jnp.abs(noised - images) * masked > 1e-3))
    x0 = images + 10.0 * (1.0 - masked * as_trained)
    return dict(x0=x0, eps=jnp.zeros_like(images), mask=masking.mask)


def test_diffmae_evaluators_ask_the_model_as_trained(data_dir, tmp_path):
  """With a model that is exact only when given noised queries and t + 1, DiffMAE's
  validation loss (x0 on masked pixels) is 0 and inpainting recovers the images."""
  from big_vision.evaluators import diffusion_loss, inpainting
  ctx, _ = make_context(data_dir, str(tmp_path), "variant=Mu/4,method=diffmae")
  ctx = dataclasses.replace(ctx, model=_PerfectDiffMAE())
  val = dict(diffusion_loss.Evaluator(ctx, num_ranges=2, split="test[:32]",
                                      batch_size=32).run(None, 0))
  assert max(val.values()) < 1e-10, val
  r = dict(inpainting.Evaluator(ctx, max_examples=8, batch_size=8, sampling_timesteps=5,
                                split="test[:8]").run(None, 1))
  assert r["masked_mse"] < 1e-8 and r["onestep_masked_mse"] < 1e-10, r


class _NoisedOnlyModel(_PerfectDiffMAE):
  """Stands for MaskDiT, whose encoder trains on noised images only: x0 is its input when
  asked as trained (t + 1 >= 1), off by 10 for a clean input at t = 0."""
  noised_queries = False

  def apply(self, variables, images, t, labels=None, *, mask_ratio=0.0, masking=None,
            noised=None, rngs=None):
    del variables, labels, noised
    x0 = images + 10.0 * (t < 1)[:, None, None, None]
    if masking is None:  # The sampler's calls have no mask_ratio, nor rngs.
      masking = (masking_lib.draw(rngs["mask"], images.shape[0], self.grid, mask_ratio)
                 if mask_ratio else masking_lib.no_masking(images.shape[0], 49))
    return dict(x0=x0, eps=jnp.zeros_like(images), mask=masking.mask)


def test_one_step_inpainting_of_noised_only_models_starts_from_noised_images(data_dir,
                                                                               tmp_path):
  """MaskDiT's one-step completion, as its reconstruction, starts from images noised at
  t = 0 (the model's t = 1), not from clean ones that it never saw."""
  from big_vision.evaluators import inpainting, reconstruction
  ctx, _ = make_context(data_dir, str(tmp_path), "variant=Mu/4,method=maskdit")
  ctx = dataclasses.replace(ctx, model=_NoisedOnlyModel())
  kw = dict(split="test[:8]", batch_size=8)
  r = dict(inpainting.Evaluator(ctx, max_examples=8, sampling_timesteps=2, **kw).run(None, 1))
  assert r["onestep_masked_mse"] < 1e-2, r  # About the noise at t = 0: 1e-4.
  assert dict(reconstruction.Evaluator(ctx, **kw).run(None, 1))["masked_mse"] < 1e-2


def test_maskdm_validation_loss_is_eps_on_visible_pixels(data_dir, tmp_path):
  """A model predicting 0 scores E[eps^2] = 1 on visible pixels and nothing else (UMD's
  branch would average it with the images' mean square, about 0.7)."""
  from big_vision.evaluators import diffusion_loss
  ctx, params = make_context(data_dir, str(tmp_path), "variant=Mu/4,method=maskdm")
  params = dict(params, head=jax.tree_util.tree_map(jnp.zeros_like, params["head"]))
  val = dict(diffusion_loss.Evaluator(ctx, split="test[:64]", batch_size=32).run(params, 0))
  assert val["loss"] == pytest.approx(1.0, abs=0.05)


def test_reconstruction_evaluator_png_and_psnr(data_dir, tmp_path):
  from big_vision.evaluators import reconstruction
  ctx, params = make_context(data_dir, str(tmp_path))
  r = dict(reconstruction.Evaluator(ctx, split="test[:40]", batch_size=16).run(params, 7))
  assert r["masked_mse"] > 0 and np.isfinite(r["masked_psnr"])
  # PSNR is averaged per image, so it is close to (not equal to) that of the mean MSE.
  assert 10 * np.log10(4 / r["masked_mse"]) == pytest.approx(r["masked_psnr"], abs=3)
  assert os.path.exists(tmp_path / "images" / "val_reconstruction_0000007.png")


def test_reconstruction_of_noised_only_models_starts_from_noised_images(data_dir, tmp_path):
  """MaskDiT never sees clean images: it reconstructs from images noised at the lightest
  step it trained on (t = 0), UMD from clean ones; a bad t fails when built."""
  from big_vision.evaluators import reconstruction
  for method, auto in (("maskdit", 0), ("umd", None)):
    ctx, params = make_context(data_dir, str(tmp_path / method), f"variant=Mu/4,method={method}")
    evaluators = {t: reconstruction.Evaluator(ctx, split="test[:16]", batch_size=16, t=t)
                  for t in ("auto", 0, None)}
    mse = {t: dict(ev.run(params, 0))["masked_mse"] for t, ev in evaluators.items()}
    assert evaluators["auto"].t == auto
    assert mse["auto"] == mse[auto] != mse[0 if auto is None else None]
  n = ctx.diffusion.num_timesteps
  with pytest.raises(ValueError, match=rf"reconstruction t={n} must be 'auto', None .*"
                                       rf"\[0, {n}\)"):
    reconstruction.Evaluator(ctx, split="test[:16]", t=n)


def test_unknown_eval_type_is_clear(data_dir, tmp_path):
  ctx, _ = make_context(data_dir, str(tmp_path))
  config = ml_collections.ConfigDict(dict(evals=dict(x=dict(type="bleu"))))
  with pytest.raises(ValueError, match="evals.x: unknown type 'bleu'; known: fewshot"):
    common.build(config, ctx, 100, 10)


def test_eval_only_matches_evaluation_at_end_of_training(data_dir, tmp_path):
  config, _ = config_cli.load_from_argv(
      ["--config=configs/ae_fmnist.py:variant=Mu/4,batch_size=32,total_steps=3,"
       "wandb_mode=disabled"])
  config.input.data.data_dir = data_dir
  config.input.shuffle_buffer_size = 500
  config.evals = ml_collections.ConfigDict(dict(
      val=dict(type="diffusion_loss", split="test[:64]"),
      probe=dict(type="fewshot", train_split="train[:300]", test_split="test[:100]",
                 shots=(5,), seeds=1, holdout_per_class=5)))
  workdir = str(tmp_path / "run")
  train.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    during = {k: v for line in f for k, v in json.loads(line).items()
              if k.startswith(("val/", "probe/")) and not k.endswith("seconds")}
  after = eval_only.evaluate(config, workdir)
  after = {k: v for k, v in after.items() if not k.endswith("seconds")}
  assert during and during == pytest.approx(after)


@pytest.fixture(scope="module")
def feature_net_weights(tmp_path_factory):
  """Weights of the right structure, made here (random, not trained)."""
  from big_vision.models import fmnist_classifier
  path = str(tmp_path_factory.mktemp("fnet") / "fmnist_classifier.npz")
  params = fmnist_classifier.Classifier().init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 28, 28, 1)))["params"]
  fmnist_classifier.save(params, path, dict(test_accuracy=None, note="random, for tests"))
  return path


def test_sampling_evaluator_fid_is_and_floor(data_dir, tmp_path, feature_net_weights):
  from big_vision.evaluators import sampling
  ctx, params = make_context(data_dir, str(tmp_path), "variant=Mu/4,use_labels=True")
  net = dict(kind="fmnist_classifier", weights=feature_net_weights)
  ev = sampling.Evaluator(ctx, num_samples=20, batch_size=10, sampling_timesteps=4,
                          guidance_scales=(2.0,), feature_net=net, max_reference=300,
                          cache_dir=str(tmp_path / "cache"))
  r = dict(ev.run(params, 3))
  # The scores are those of these samples, against the reference split's statistics
  # computed here at once from all its images (the scorer streams them batch by batch),
  # with the IS written out independently of fid_math; samples as 8-bit images.
  net = ev.scorer.net
  real = common.collect(ctx, ev.scorer.reference_cfg, lambda b: {"x": b["image"]}, 300)["x"]
  assert real.shape == (300, 28, 28, 1)
  reference = fid_math.feature_statistics(net(real)[0])

  def inception_score(p):  # exp(E KL(p(y|x) || p(y))), averaged over 10 splits.
    return np.mean([np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1)))
                    for q in np.array_split(p, 10)])

  for prefix, scale, conditional in (("", None, False), ("cfg2/", 2.0, True)):
    feats, probs = net(fid_scorer.to_8bit(ev.samples(params, scale, conditional)))
    assert r[prefix + "is_fmnist_classifier"] == pytest.approx(inception_score(probs),
                                                               rel=1e-9)
    assert r[prefix + "fid_fmnist_classifier"] == pytest.approx(
        fid_math.frechet_distance(*fid_math.feature_statistics(feats), *reference), rel=1e-6)
  floor = net(common.collect(ctx, ev.floor_cfg, lambda b: {"x": b["image"]}, 20)["x"])
  assert r["is_fmnist_classifier_real_floor"] == pytest.approx(inception_score(floor[1]),
                                                               rel=1e-9)
  assert r["fid_fmnist_classifier_real_floor"] == pytest.approx(
      fid_math.frechet_distance(*fid_math.feature_statistics(floor[0]), *reference), rel=1e-6)
  assert "fid" not in r  # Never called plain FID without Inception.
  assert r["fid_fmnist_classifier_real_floor"] < r["fid_fmnist_classifier"]
  assert len(os.listdir(tmp_path / "cache")) == 1  # Reference statistics cached once.
  images = sorted(os.listdir(tmp_path / "images"))
  assert images == ["samples_cfg2_0000003.png", "samples_uncond_0000003.png"]
  samples = ev.samples(params)
  assert samples.shape == (20, 28, 28, 1) and samples.min() >= -1 and samples.max() <= 1


def test_evaluators_missing_feature_net_weights_run_without_fid(data_dir, tmp_path):
  """Sample grids and inpainting's MSE still run without FID/IS, each said in one line; a
  sampling eval without a grid then has nothing to do and is skipped."""
  ctx, params = make_context(data_dir, str(tmp_path))
  net = dict(kind="fmnist_classifier", weights=str(tmp_path / "nope.npz"))
  config = ml_collections.ConfigDict(dict(evals=dict(
      s=dict(type="sampling", feature_net=net, num_grid=4, sampling_timesteps=2,
             batch_size=4),
      g=dict(type="sampling", feature_net=net, num_grid=0),
      i=dict(type="inpainting", feature_net=net, max_examples=8, batch_size=8,
             sampling_timesteps=2, split="test[:8]"))))
  said = []
  built = {e.name: e.evaluator for e in common.build(config, ctx, 100, 10, log=said.append)}
  assert set(built) == {"s", "i"}
  said = {line.split()[1]: line for line in said}
  assert said["s"].startswith("eval s without FID/IS: ") and "train_feature_net" in said["s"]
  assert said["g"].startswith("eval g skipped: ") and "nope.npz" in said["g"]
  assert said["i"].startswith("eval i without FID/IS: ")
  assert built["s"].num_samples == 4 and not dict(built["s"].run(params, 1))
  assert os.path.exists(tmp_path / "images" / "s_uncond_0000001.png")
  assert set(dict(built["i"].run(params, 1))) == {
      "masked_mse", "masked_psnr", "onestep_masked_mse", "onestep_masked_psnr"}


@pytest.mark.parametrize("content", [b"", "half"])
def test_unreadable_feature_net_weights_are_a_config_error_naming_the_file(
    data_dir, tmp_path, feature_net_weights, content):
  """Not an EOFError or BadZipFile from inside numpy, before the hosts' vote."""
  ctx, _ = make_context(data_dir, str(tmp_path))
  path = str(tmp_path / "broken.npz")
  if content == "half":
    with open(feature_net_weights, "rb") as f:
      content = f.read()[:4000]
  with open(path, "wb") as f:
    f.write(content)
  config = ml_collections.ConfigDict(dict(evals=dict(s=dict(
      type="sampling", feature_net=dict(kind="fmnist_classifier", weights=path)))))
  with pytest.raises(ConfigError, match=r"evals.s: .*broken.npz \(\d+ bytes\) is not a "
                                        r"readable .npz file.*train_feature_net --out"):
    common.build(config, ctx, 100, 10)


def test_feature_net_of_another_image_shape_is_a_config_error(data_dir, tmp_path,
                                                              feature_net_weights):
  ctx, _ = make_context(data_dir, str(tmp_path))
  rgb32 = ae.build_model(dict(ctx.config.model.to_dict(), image_size=32, channels=3))
  ctx = dataclasses.replace(ctx, model=rgb32)
  config = ml_collections.ConfigDict(dict(evals=dict(s=dict(
      type="sampling", feature_net=dict(kind="fmnist_classifier",
                                        weights=feature_net_weights)))))
  with pytest.raises(ConfigError, match=r"evals.s: feature_net: feature network "
                                        r"'fmnist_classifier' takes 28x28x1 images, not "
                                        r"32x32x3; use kind='inception'"):
    common.build(config, ctx, 100, 10)


def test_inpainting_keeps_visible_pixels(data_dir, tmp_path):
  from big_vision.evaluators import inpainting
  ctx, params = make_context(data_dir, str(tmp_path))
  model = ctx.model
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, 28, 28, 1), minval=-1, maxval=1)
  pixel_mask = jnp.zeros((4, 28, 28, 1)).at[:, :14].set(1.0)
  out = inpainting.inpaint(objective.model_eps_fn(model, params), ctx.diffusion, images,
                           pixel_mask, jax.random.PRNGKey(1), sampling_timesteps=5)
  np.testing.assert_array_equal(out[:, 14:], images[:, 14:])
  assert np.abs(np.asarray(out[:, :14] - images[:, :14])).max() > 0.1
  r = dict(inpainting.Evaluator(ctx, max_examples=16, batch_size=8, sampling_timesteps=4,
                                split="test[:16]").run(params, 2))
  assert set(r) == {"masked_mse", "masked_psnr", "onestep_masked_mse", "onestep_masked_psnr"}
  assert os.path.exists(tmp_path / "images" / "inpainting_0000002.png")
  # DiT's x0 head is trained nowhere: no one-step completion, in the metrics or the grid.
  ctx.config.update(no_noise_prob=0.0, mask_ratio=0.0)
  r = dict(inpainting.Evaluator(ctx, max_examples=8, batch_size=8, sampling_timesteps=2,
                                split="test[:8]").run(params, 3))
  assert set(r) == {"masked_mse", "masked_psnr"}
  rows = np.asarray(Image.open(tmp_path / "images" / "inpainting_0000003.png")).shape[0]
  assert rows < np.asarray(Image.open(tmp_path / "images" / "inpainting_0000002.png")).shape[0]


_SHARDED_SAMPLING = """
import sys
import jax, numpy as np
from big_vision import sharding
from big_vision.evaluators import sampling
from tests.test_evaluators import make_context
ctx, params = make_context(sys.argv[1], sys.argv[2], "variant=Mu/4,use_labels=True")
one = sharding.make_mesh(jax.devices()[:1])
ctx1 = ctx.__class__(**dict(vars(ctx), mesh=one, data_sharding=sharding.batch_sharding(one)))
kw = dict(num_samples=10, sampling_timesteps=3)
ev4, ev1 = sampling.Evaluator(ctx, batch_size=6, **kw), sampling.Evaluator(ctx1, batch_size=8, **kw)
assert (ev4.batch_size, ev1.batch_size) == (8, 8)  # Rounded up to the 4 devices.
# Each device's program samples its 2 images: no 8-image array anywhere in it (sampled
# whole and split at the end, it would hold them).
hlo = ev4._generate.lower(params, jax.random.PRNGKey(0), 0, None, False).compile().as_text()
assert "f32[2,28,28,1]" in hlo and "f32[8,28,28,1]" not in hlo
for scale, cond in ((None, False), (2.0, True)):
  np.testing.assert_allclose(ev4.samples(params, scale, cond), ev1.samples(params, scale, cond),
                             atol=2e-5)
print("OK")
"""


def test_sampling_is_split_over_the_devices_and_equals_one_device(data_dir, tmp_path):
  # Samples on 4 devices, each generating its share of the batch, are the samples of one.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SAMPLING, data_dir, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
