r"""Trains the Fashion-MNIST feature network used for FID/IS-style metrics on this data.

  python -m big_vision.tools.train_feature_net --out ~/.cache/big_vision/fmnist_classifier.npz

Trains on the train split with labels (a few minutes on 2 CPU cores), reports test accuracy,
and saves the weights (.npz) and a .json with the accuracy and settings.
"""
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from big_vision import input_pipeline
from big_vision.models import fmnist_classifier

DEFAULT_PATH = os.path.expanduser("~/.cache/big_vision/fmnist_classifier.npz")


def _input(split, batch_size, pp, data_dir, shuffle=0):
  return ml_collections.ConfigDict(dict(
      data=dict(name="fashion_mnist_local", split=split, data_dir=data_dir), pp=pp,
      batch_size=batch_size, shuffle_buffer_size=shuffle, cache_raw=True))


def train(out, epochs=2.0, batch_size=128, lr=2e-3, data_dir=None, train_split="train",
          test_split="test", seed=0, log=print):
  """Trains, evaluates and saves. Returns the test accuracy."""
  model = fmnist_classifier.Classifier()
  pp = "value_range(-1, 1)|keep('image', 'label')"
  ds, num = input_pipeline.training(_input(train_split, batch_size, "flip_lr|" + pp, data_dir,
                                           shuffle=10_000), seed=seed)
  steps = int(epochs * num / batch_size)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)))["params"]
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      _, logits = model.apply({"params": p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.time()
  for i, batch in zip(range(steps), ds.as_numpy_iterator()):
    params, opt_state, loss = step(params, opt_state, batch["image"], batch["label"])
    if (i + 1) % 100 == 0 or i + 1 == steps:
      log(f"step {i + 1}/{steps} loss {float(loss):.4f} ({time.time() - start:.0f}s)")

  predict = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])
  test_ds, _ = input_pipeline.evaluation(_input(test_split, 500, pp, data_dir))
  correct = total = 0
  for batch in test_ds.as_numpy_iterator():
    logits = predict(params, batch["image"])
    valid = batch[input_pipeline.MASK_KEY]
    correct += int(((np.argmax(logits, -1) == batch["label"]) & valid).sum())
    total += int(valid.sum())
  accuracy = correct / total
  fmnist_classifier.save(params, out, dict(
      network=fmnist_classifier.NAME, test_accuracy=accuracy, test_examples=total,
      epochs=epochs, batch_size=batch_size, lr=lr, train_split=train_split,
      seconds=time.time() - start))
  log(f"test accuracy {accuracy:.4f} on {total} images; saved {out}")
  return accuracy


def main(argv):
  del argv
  f = flags.FLAGS
  train(f.out, epochs=f.epochs, data_dir=f.data_dir)


if __name__ == "__main__":
  flags.DEFINE_string("out", DEFAULT_PATH, "Where to save the weights (.npz).")
  flags.DEFINE_float("epochs", 2.0, "Training epochs.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir (default $TFDS_DATA_DIR).")
  app.run(main)
