"""Probe and evaluator options checked when built (they gave nan or clamped steps)."""
import os

import numpy as np
import pytest

from big_vision.config_parsing import ConfigError
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
