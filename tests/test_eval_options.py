"""Probe and evaluator options checked when built (they gave nan or clamped steps)."""
import os

import jax
import ml_collections
import numpy as np
import pytest

from big_vision.config_parsing import ConfigError
from big_vision.evaluators import common
from big_vision.evaluators import linear_probe
from tests.test_evaluators import make_context


@pytest.mark.parametrize("kw,message", [
    (dict(holdout_per_class=0), "holdout_per_class=0 must be an int >= 1"),
    (dict(seeds=0), "seeds=0 must be an int >= 1"),
    (dict(shots=(0, 5)), r"shots=\(0, 5\) must be a non-empty list of ints >= 1"),
    (dict(shots=()), r"shots=\(\) must be a non-empty"),
])
def test_probe_rejects_degenerate_options(kw, message):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(200, 4)), np.arange(200) % 4
  with pytest.raises(ConfigError, match=message):
    linear_probe.few_shot(x, y, x, y, **dict(dict(shots=(5,)), **kw))


def test_fewshot_and_reconstruction_check_options_at_construction(data_dir, tmp_path):
  from big_vision.evaluators import fewshot
  from big_vision.evaluators import reconstruction
  ctx, _ = make_context(data_dir, str(tmp_path))
  n = ctx.diffusion.num_timesteps
  for t in (n, -1, 2.5):  # Indexing would clamp or wrap: a silently different noise level.
    with pytest.raises(ValueError, match=rf"t={t!r} must be a diffusion step, an int in "
                                         rf"\[0, {n - 1}\]"):
      fewshot.Evaluator(ctx, features="noised", t=t)
  fewshot.Evaluator(ctx, features="noised", t=n - 1)
  fewshot.Evaluator(ctx, features="representation", t=n)  # t is not used there.
  with pytest.raises(ConfigError, match="seeds=0"):
    fewshot.Evaluator(ctx, seeds=0)
  with pytest.raises(ValueError, match="mask ratio 1.0 is outside"):
    reconstruction.Evaluator(ctx, mask_ratio=1.0)


def test_guidance_scales_need_a_conditional_model(data_dir, tmp_path):
  from big_vision.evaluators import sampling
  from configs import ae_fmnist
  ctx, _ = make_context(data_dir, str(tmp_path))  # Unconditional.
  with pytest.raises(ValueError, match=r"guidance_scales=\(1.0, 3.0\) needs a "
                                       r"class-conditional model"):
    sampling.Evaluator(ctx, guidance_scales=(1.0, 3.0))
  assert sampling.Evaluator(ctx).guidance_scales == ()
  # The config asks for guidance only where there are labels.
  assert "guidance_scales" not in ae_fmnist.get_config("").evals.samples
  assert ae_fmnist.get_config("use_labels=True").evals.samples.guidance_scales == (1.0, 3.0)


def test_concurrent_writers_of_the_same_statistics_file(tmp_path):
  """Hosts sharing a cache directory may save the same reference statistics at once."""
  import threading
  from big_vision.evaluators import fid_math
  path = str(tmp_path / "stats.npz")
  mu, sigma = np.zeros(300), np.eye(300)
  errors = []

  def work():
    for _ in range(10):
      try:
        fid_math.save_statistics(path, mu, sigma, network="x")
        fid_math.load_statistics(path)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(repr(e))
  threads = [threading.Thread(target=work) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors[:3]
  assert os.listdir(tmp_path) == ["stats.npz"]  # No temporary files left behind.


def test_floor_split_already_sliced_stays_valid():
  from big_vision.evaluators import sampling  # pylint: disable=g-import-not-at-top
  assert sampling._first("train", 500) == "train[:500]"
  assert sampling._first("train[:1000]", 500) == "train[:1000]"  # Not "train[:1000][:500]".


def _build(ctx, **evals):
  return common.build(ml_collections.ConfigDict(dict(evals=evals)), ctx, 100, 10)


@pytest.mark.parametrize("spec,message", [
    (dict(num_sample=8), r"evals.s: unknown option 'num_sample' for type 'sampling'; "
                         r"allowed: .*num_samples"),
    (dict(feature_net="fmnist_classifier"), r"evals.s: feature_net='fmnist_classifier' must "
                                            r"be dict\(kind=..., weights=PATH\)"),
    (dict(feature_net=dict(kind="inception")), r"evals.s: feature_net has keys kind; it must "
                                               r"be dict\(kind=..., weights=PATH\)"),
    (dict(num_samples=0), r"evals.s: num_samples=0 must be an int >= 1"),
    (dict(num_samples=1, feature_net=dict(kind="inception", weights="w.npz")),
     r"evals.s: num_samples=1 must be an int >= 2 \(FID needs two samples"),
    (dict(batch_size=0), r"evals.s: batch_size=0 must be an int >= 1"),
    (dict(num_grid=-1), r"evals.s: num_grid=-1 must be an int >= 0"),
])
def test_bad_sampling_options_are_one_line_config_errors(data_dir, tmp_path, spec, message):
  ctx, _ = make_context(data_dir, str(tmp_path))
  with pytest.raises(ConfigError, match=message) as e:
    _build(ctx, s=dict(type="sampling", **spec))
  assert "\n" not in str(e.value)


def test_evals_of_one_type_write_their_own_images(data_dir, tmp_path):
  """File names come from the eval's name; the default configs' names are unchanged; a
  grid of 0 images writes none."""
  ctx, params = make_context(data_dir, str(tmp_path))
  kw = dict(type="sampling", num_samples=2, batch_size=2, sampling_timesteps=2, num_grid=4)
  built = _build(ctx, samples=kw, more=kw, none=dict(kw, num_grid=0),
                 reconstruction=dict(type="reconstruction", split="test[:8]", batch_size=8),
                 val2=dict(type="reconstruction", split="test[:8]", batch_size=8))
  common.run_due(built, 5, 5, dict(params=params), _NoWriter(), lambda *_: None)
  assert sorted(os.listdir(tmp_path / "images")) == [
      "more_uncond_0000005.png", "samples_uncond_0000005.png",
      "val_reconstruction_0000005.png", "val_val2_0000005.png"]


class _NoWriter:
  def write(self, step, results):
    pass

  def flush(self):
    pass


def test_guidance_scale_one_samples_without_the_null_half(data_dir, tmp_path):
  """Scale 1 is the conditional eps: sampled with it alone (the un-doubled batch), the same
  images as the guided computation at scale 1."""
  from big_vision.evaluators import sampling  # pylint: disable=g-import-not-at-top
  ctx, params = make_context(data_dir, str(tmp_path), "variant=Mu/4,use_labels=True")
  ev = sampling.Evaluator(ctx, num_samples=4, batch_size=4, sampling_timesteps=3)
  scales, generate = [], ev._generate
  ev._generate = lambda *a: scales.append(a[3]) or generate(*a)
  plain = ev.samples(params, 1.0, conditional=True)
  assert scales == [None]
  guided = np.clip(np.asarray(generate(params, jax.random.fold_in(jax.random.PRNGKey(0), 0),
                                       0, 1.0, True)), -1, 1)
  np.testing.assert_allclose(plain, guided, atol=1e-4)
  hlo = lambda scale: generate.lower(params, jax.random.PRNGKey(0), 0, scale,
                                     True).compile().as_text()
  assert "f32[8,28,28,1]" in hlo(1.0) and "f32[8,28,28,1]" not in hlo(None)
