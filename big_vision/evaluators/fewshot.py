"""Few-shot linear probe of the encoder's representation (or of raw pixels).

features:
  "representation": mean cls token of clean, unmasked images (model.representation);
  "noised": the same for images noised to step `t` (default T // 10: 100 of 1000), for
            models that never saw clean inputs, e.g. DiT;
  "pixels": the flattened input pixels, the baseline a representation must beat.
The ridge strength is chosen on a held-out part of the train pool; accuracy is measured
on the test split; mean and spread over `seeds` draws of the shots.
"""
import jax
import jax.numpy as jnp

from big_vision.config_parsing import is_int
from big_vision.evaluators import common
from big_vision.evaluators import linear_probe

FEATURES = ("representation", "noised", "pixels")


class Evaluator:
  """Yields {k}shot (mean accuracy) and {k}shot_std for every shot count k."""

  def __init__(self, context, features="representation", t=None, train_split="train[:10000]",
               test_split="test", shots=(1, 5, 10, 25, 100), seeds=3, holdout_per_class=20,
               data=None, pp=None, batch_size=None):
    if features not in FEATURES:
      raise ValueError(f"fewshot: unknown features {features!r}; known: {', '.join(FEATURES)}")
    linear_probe.check_options(shots, seeds, holdout_per_class)  # Before any training.
    n = context.diffusion.num_timesteps
    t = n // 10 if t is None else t  # 100 of T = 1000, and a valid step for any T.
    if features == "noised" and not (is_int(t) and 0 <= t < n):
      raise ValueError(f"fewshot: t={t!r} must be a diffusion step, an int in [0, {n - 1}]")
    self.context, self.features, self.t = context, features, int(t)
    self.shots, self.seeds, self.holdout = tuple(shots), int(seeds), int(holdout_per_class)
    self.train_cfg = common.eval_input_config(context, data, pp, batch_size, train_split)
    self.test_cfg = common.eval_input_config(context, data, pp, batch_size, test_split)
    self._cache = None  # The pixels' results: they do not change during training.
    model, diffusion = context.model, context.diffusion

    def featurize(params, images, key):
      if features == "pixels":
        return images.reshape(images.shape[0], -1)
      t = jnp.zeros((images.shape[0],), jnp.int32)
      if features == "noised":
        t = jnp.full((images.shape[0],), self.t, jnp.int32)
        images = diffusion.q_sample(images, t, jax.random.normal(key, images.shape))
        t = t + 1  # The network keeps 0 for clean inputs.
      return model.apply({"params": params}, images, t, method=model.representation)
    self._featurize = jax.jit(featurize)

  def _features(self, params, input_cfg, seed):
    """Features of a split; "noised" draws its noise from `seed` (one per split, so that
    train and test images at the same position are not noised alike) and the batch index."""
    counter = iter(range(1 << 30))

    def fn(batch):
      key = jax.random.fold_in(jax.random.PRNGKey(seed), next(counter))
      return {"x": self._featurize(params, batch["image"], key), "y": batch["label"]}
    out = common.collect(self.context, input_cfg, fn,
                         what=f"{self.features} features of {input_cfg['data']['split']}")
    return out["x"], out["y"]

  def run(self, params, step):
    del step
    if self._cache is not None:  # Pixels: the same features, the same probe, each time.
      yield from self._cache
      return
    train_x, train_y, test_x, test_y = (self._features(params, self.train_cfg, 0)
                                        + self._features(params, self.test_cfg, 1))
    results = linear_probe.few_shot(train_x, train_y, test_x, test_y, shots=self.shots,
                                    seeds=self.seeds, holdout_per_class=self.holdout)
    out = []
    for k, (mean, std, _, _) in results.items():
      out += [(f"{k}shot", mean), (f"{k}shot_std", std)]
    if self.features == "pixels":
      self._cache = out
    yield from out
