"""Evaluators on tiny models and data, the probe's math on synthetic features, eval_only."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision import config_cli
from big_vision import diffusion as diffusion_lib
from big_vision import input_pipeline
from big_vision import sharding
from big_vision import train
from big_vision.evaluators import common
from big_vision.evaluators import linear_probe
from big_vision.models import ae
from big_vision.tools import eval_only


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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_dataset_builder("fashion_mnist_local", path)
  return path


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
  pixels = dict(fewshot.Evaluator(ctx, features="pixels", **kw).run(params, 0))
  assert set(pixels) == {"1shot", "1shot_std", "10shot", "10shot_std"}
  assert pixels["10shot"] > 0.5  # Fashion-MNIST pixels are far better than chance.
  rep = dict(fewshot.Evaluator(ctx, features="representation", **kw).run(params, 0))
  noised = dict(fewshot.Evaluator(ctx, features="noised", t=50, **kw).run(params, 0))
  for r in (rep, noised):
    assert 0.0 <= r["10shot"] <= 1.0 and r["10shot"] > 0.15  # Random ViT features beat chance.


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


def test_reconstruction_evaluator_png_and_psnr(data_dir, tmp_path):
  from big_vision.evaluators import reconstruction
  ctx, params = make_context(data_dir, str(tmp_path))
  r = dict(reconstruction.Evaluator(ctx, split="test[:40]", batch_size=16).run(params, 7))
  assert r["masked_mse"] > 0 and np.isfinite(r["masked_psnr"])
  # PSNR is averaged per image, so it is close to (not equal to) that of the mean MSE.
  assert 10 * np.log10(4 / r["masked_mse"]) == pytest.approx(r["masked_psnr"], abs=3)
  assert os.path.exists(tmp_path / "images" / "val_reconstruction_0000007.png")


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
