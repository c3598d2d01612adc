"""Per-example randomness for preprocessing ops.

Random ops use TensorFlow's *stateless* random functions, whose output depends
only on an explicit seed. The seed comes from the example itself:

* If the example has a `"_seed"` entry (an int32/int64 tensor of shape [2]),
  each random op splits it into (seed for this op, seed for the following ops)
  and writes the latter back. The result is a function of the example's seed
  and the op's position in the pp string only, so it is reproducible and
  independent of tf.data's parallelism. `input_pipeline.training` attaches such
  a seed to every example (derived from the pipeline seed, the process index
  and the example's position in the stream) and removes it after
  preprocessing.
* Without `"_seed"`, a seed is drawn from TensorFlow's global (stateful)
  generator, so augmentations differ between examples but are not
  reproducible between runs.
"""
import tensorflow as tf

SEED_KEY = "_seed"


def add_seed(data: dict, seed) -> dict:
  """Returns `data` with a per-example stateless seed attached."""
  return {**data, SEED_KEY: tf.cast(seed, tf.int64)}


def next_seed(data: dict) -> tuple[dict, tf.Tensor]:
  """Returns (data with an advanced seed, seed for the calling op)."""
  if SEED_KEY not in data:
    seed = tf.random.uniform([2], minval=tf.int32.min, maxval=tf.int32.max,
                             dtype=tf.int32)
    return data, seed
  seeds = tf.random.experimental.stateless_split(data[SEED_KEY], num=2)
  return {**data, SEED_KEY: seeds[0]}, seeds[1]
