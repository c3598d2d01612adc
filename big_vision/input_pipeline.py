"""Input pipelines: tf.data on every process, global jax.Arrays for the model.

Each process reads its own disjoint slice of a TFDS split, preprocesses it
with a pp string (see `big_vision/pp`) and batches `batch_size //
process_count` examples. `start_global` then assembles the per-process
batches into global `jax.Array`s sharded along the batch dimension.

Input config fields (ml_collections.ConfigDict or anything with `.get`):
  data.name, data.split, data.data_dir (optional, else TFDS_DATA_DIR or TFDS's
  default), data.skip_decode (optional tuple of image features to hand to pp
  still encoded, e.g. ("image",) for ImageNet; by default TFDS decodes them,
  and the `decode` pp op passes decoded images through); every other key of
  data is an argument of the dataset's builder (e.g. data.source_dir for
  image_folder_local; a key the builder does not take is a ConfigError), pp, batch_size
  (GLOBAL), shuffle_buffer_size (training; 0/None: no shuffling), cache_raw
  (cache the examples as read, before pp, in memory), cache_final
  (evaluation: cache the finished batches), prefetch (batches, default 2),
  seed (default 0).

Resuming training (the data position): `training(..., skip_batches=n)`
recreates the exact stream a fresh pipeline would produce from its (n+1)th
batch on. This relies on the pipeline being deterministic (seeded file and
buffer shuffles, per-example augmentation seeds, deterministic tf.data
ordering), and it costs re-reading and shuffling -- but not preprocessing --
the n * local_batch examples already consumed: cheap for small datasets,
minutes deep into ImageNet-sized epochs. It needs the same data, pp string,
seed, batch size and process count as the original run. We prefer this to checkpointing the tf.data
iterator with tf.train.Checkpoint, which stores the shuffle and prefetch
buffers (GBs for large buffers of images) and breaks with some ops.
"""
import difflib
import inspect
import math
import os
import queue
import threading
from typing import Any, Iterable, Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from big_vision import datasets
from big_vision.config_parsing import ConfigError
from big_vision.pp import builder as pp_builder
from big_vision.pp import rng

MASK_KEY = "_mask"
# The keys of a data config that the pipeline reads; all others go to the builder.
DATA_KEYS = ("name", "split", "data_dir", "skip_decode")


def builder_kwargs(data_config) -> dict:
  """The builder's own arguments in a data config (e.g. source_dir): every key but
  DATA_KEYS; None values are left out, so the builder keeps its default."""
  return {k: v for k, v in data_config.items() if k not in DATA_KEYS and v is not None}


def dataset_builder(data_config, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """`get_dataset_builder` for a data config: its name, data_dir and builder arguments."""
  return get_dataset_builder(data_config["name"], data_config.get("data_dir"), prepare,
                             **builder_kwargs(data_config))


def _init_args(cls) -> set[str]:
  """The keyword arguments a builder class's constructor takes, following **kwargs up
  its base classes."""
  names = set()
  for c in cls.__mro__:
    if "__init__" not in vars(c):
      continue
    params = inspect.signature(c.__init__).parameters.values()
    names |= {p.name for p in params if p.name != "self" and p.kind in (
        p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind == p.VAR_KEYWORD for p in params):
      break
  return names


def _check_builder_kwargs(name: str, kwargs: dict):
  """A data key that is neither the pipeline's nor the builder's: a ConfigError (else a
  typo such as `sorce_dir` would be ignored, or fail deep inside TFDS)."""
  if not kwargs:
    return
  base = datasets.base_name(name)
  try:
    cls = datasets.BUILDERS.get(base) or tfds.builder_cls(base)
  except tfds.core.DatasetNotFoundError:
    return  # tfds.builder names the unknown dataset.
  allowed = sorted(_init_args(cls) - set(DATA_KEYS))
  bad = sorted(set(kwargs) - set(allowed))
  if bad:
    raise ConfigError(
        f"data.{bad[0]}={kwargs[bad[0]]!r}: dataset {name!r} takes no argument "
        f"{', '.join(bad)}; data's keys are {', '.join(DATA_KEYS)} and the builder's "
        f"arguments ({', '.join(allowed) or 'none'})")


def get_dataset_builder(name: str, data_dir: str | None = None, prepare: bool = True,
                        **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Returns a TFDS builder whose data is ready to read.

  Our own datasets (`big_vision.datasets.BUILDERS`) are prepared on first use (a
  collective with several processes: all of them must call it), unless prepare=False,
  which only checks that the name is known. Other TFDS datasets cannot be downloaded
  here, so they must already be prepared in `data_dir` (default: TFDS_DATA_DIR, else
  ~/tensorflow_datasets). `builder_kwargs` go to the builder's constructor (e.g.
  source_dir= for image_folder_local); one it does not take is a ConfigError.
  """
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  _check_builder_kwargs(name, builder_kwargs)
  if datasets.base_name(name) in datasets.BUILDERS:
    if not prepare:
      return tfds.builder(name, data_dir=data_dir, **builder_kwargs)
    if jax.process_count() == 1:
      return datasets.prepare(name, data_dir, **builder_kwargs)
    return _prepare_process_zero_first(name, data_dir, **builder_kwargs)
  try:
    builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
  except tfds.core.DatasetNotFoundError:
    # A config mistake: one line (train.py prints ConfigErrors without a traceback).
    near = difflib.get_close_matches(
        datasets.base_name(name), tfds.list_builders(with_community_datasets=False), n=3)
    hint = f" (closest TFDS names: {', '.join(near)})" if near else ""
    raise ConfigError(
        f"unknown dataset {name!r}: neither one of ours "
        f"({', '.join(sorted(datasets.BUILDERS))}) nor a TFDS dataset{hint}") from None
  if not builder.is_prepared():
    root = os.path.dirname(os.path.dirname(os.fspath(builder.data_path)))
    raise FileNotFoundError(
        f"Dataset {name!r} is not prepared in data_dir {root!r} (no "
        f"{os.fspath(builder.data_path)}) and cannot be downloaded here; "
        f"prepare it with `tfds build {name} --data_dir={root}` (manual-download"
        f" datasets like imagenet2012 need their archives in {root}/downloads/"
        "manual first), or point data.data_dir / TFDS_DATA_DIR to where it is.")
  return builder


def _prepare_process_zero_first(name, data_dir, **builder_kwargs):
  """Process 0 prepares, then the others: on a shared data_dir they find it prepared
  (together they would write the same files at once); on host-local ones each prepares
  its own. If process 0 fails, every process stops, none waiting or writing."""
  builder, error = None, None
  if jax.process_index() == 0:
    try:
      builder = datasets.prepare(name, data_dir, **builder_kwargs)
    except Exception as e:  # pylint: disable=broad-except
      error = e
  # Also the barrier: the others start once process 0 is done.
  ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise RuntimeError(f"process 0 could not prepare dataset {name!r} (its log says why)")
  if builder is None:
    builder = datasets.prepare(name, data_dir, **builder_kwargs)
  return builder


def shard_split(split: str, process_index: int, process_count: int):
  """This process's disjoint slice of `split` (sizes differ by at most 1)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in "
                     f"[0, process_count={process_count}).")
  return tfds.even_splits(split, n=process_count)[process_index]


def _local_batch_size(batch_size: int) -> int:
  count = jax.process_count()
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"batch_size={batch_size} (global) must be a positive "
                     f"multiple of the number of processes ({count}).")
  return batch_size // count


def _read(builder, split, *, shuffle_files: bool, seed: int,
          skip_decode=()) -> tf.data.Dataset:
  """Reads a split; features in `skip_decode` stay encoded for pp to decode."""
  features = builder.info.features
  bad = [k for k in skip_decode if k not in features.keys()
         or not isinstance(features[k], tfds.features.Image)]
  if bad:
    images = [k for k, f in features.items()
              if isinstance(f, tfds.features.Image)]
    raise ConfigError(f"data.skip_decode={tuple(skip_decode)!r}: {bad} are not "
                      f"image features of {builder.name}; those are {images}")
  skip = {k: tfds.decode.SkipDecoding() for k in skip_decode}
  read_config = tfds.ReadConfig(
      shuffle_seed=seed,
      try_autocache=False,  # We cache explicitly (cache_raw/cache_final).
      skip_prefetch=True)   # We prefetch batches at the end instead.
  # TFDS refuses to shuffle the files of datasets built in a fixed order.
  shuffle_files = shuffle_files and not builder.info.disable_shuffling
  return builder.as_dataset(split=split, shuffle_files=shuffle_files,
                            decoders=skip or None, read_config=read_config)


def _with_example_seeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
  """Attaches a stateless seed to each example, see `pp/rng.py`."""
  base = tf.constant([seed, jax.process_index()], tf.int64)
  return ds.enumerate().map(
      lambda i, ex: rng.add_seed(
          ex, tf.random.experimental.stateless_fold_in(base, i)))


def num_classes(data_config) -> int | None:
  """Classes of the dataset's `label` feature (a ClassLabel); None when it has none."""
  builder = dataset_builder(data_config, prepare=False)
  features = builder.info.features
  label = features["label"] if "label" in features.keys() else None
  return label.num_classes if isinstance(label, tfds.features.ClassLabel) else None


def _preprocess(pp):
  """The example -> example function of a pp string (an unknown op: a ConfigError)."""
  try:
    pp_fn = pp_builder.get_preprocess_fn(pp)
  except ValueError as e:
    raise ConfigError(f"pp={pp!r}: {e}") from None

  def _pp(data):
    data = pp_fn(data)
    data.pop(rng.SEED_KEY, None)  # Unless `keep` already dropped it.
    return data
  return _pp


def _map_pp(ds, fn, pp):
  """ds.map(fn). The map traces the pp once, here: an op that fails on the dataset's
  features (a key it lacks, an encoded image) is a one-line ConfigError."""
  try:
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  except (KeyError, ValueError, TypeError) as e:
    features = sorted(k for k in ds.element_spec if k != rng.SEED_KEY)
    why = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise ConfigError(f"pp={pp!r} fails on the features {features}: {why}") from None


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def training(input_config, *, seed: int | None = None, skip_batches: int = 0
            ) -> tuple[tf.data.Dataset, int]:
  """Infinite, shuffled, preprocessed per-process batches.

  Returns (dataset, number of examples in the whole split, all processes).
  The stream of the dataset's first iterator is a deterministic function of
  the config, `seed` (default: input_config.seed, else 0) and
  `jax.process_index()`/`process_count()`; a second iterator over the same
  dataset object continues the shuffling like a new epoch, so call `training`
  again to replay. `skip_batches` resumes after that many batches (see the
  module docstring).
  """
  cfg = input_config
  local_bs = _local_batch_size(cfg.batch_size)
  seed = cfg.get("seed", 0) if seed is None else seed
  builder = dataset_builder(cfg.data)
  num_examples = builder.info.splits[cfg.data.split].num_examples
  pp = _preprocess(cfg.pp)  # Fail early on a bad pp.

  split = shard_split(cfg.data.split, jax.process_index(), jax.process_count())
  ds = _read(builder, split, shuffle_files=True, seed=seed,
             skip_decode=cfg.data.get("skip_decode", ()))
  if cfg.get("cache_raw", False):
    ds = ds.cache()
  if cfg.get("shuffle_buffer_size"):
    ds = ds.shuffle(cfg.shuffle_buffer_size, seed=seed)
  ds = ds.repeat()
  # Seeds come before the skip so that resumed examples get the same ones.
  ds = _with_example_seeds(ds, seed)
  if skip_batches:
    ds = ds.skip(skip_batches * local_bs)  # Skips before the costly pp.
  ds = _map_pp(ds, pp, cfg.pp)
  ds = ds.batch(local_bs, drop_remainder=True)
  ds = ds.prefetch(cfg.get("prefetch", 2))
  return _deterministic(ds), num_examples


def _padding(element_spec: dict) -> tf.data.Dataset:
  """Infinite all-zero examples with the given (fully defined) shapes."""
  bad = {k: s.shape for k, s in element_spec.items()
         if not s.shape.is_fully_defined()}
  if bad:
    raise ValueError(f"Evaluation needs fixed-size examples after pp to pad "
                     f"the last batch; these are not: {bad}. Add e.g. "
                     "`resize(...)` to the pp string.")
  zeros = {k: tf.zeros(s.shape, s.dtype) for k, s in element_spec.items()}
  return tf.data.Dataset.from_tensors(zeros).repeat()


def evaluation(input_config) -> tuple[tf.data.Dataset, int]:
  """One deterministic pass over the split, every example exactly once.

  All processes yield the same number of batches (needed for collective
  jitted eval steps); the last ones are padded with all-zero examples. Each
  example has a boolean `_mask`, False for padding: weight metrics by it.
  Returns (dataset, number of real examples in the whole split).
  """
  cfg = input_config
  local_bs = _local_batch_size(cfg.batch_size)
  count, index = jax.process_count(), jax.process_index()
  builder = dataset_builder(cfg.data)
  pp = _preprocess(cfg.pp)

  splits = [shard_split(cfg.data.split, i, count) for i in range(count)]
  sizes = [builder.info.splits[s].num_examples for s in splits]
  num_batches = math.ceil(max(sizes) / local_bs)

  ds = _read(builder, splits[index], shuffle_files=False, seed=0,
             skip_decode=cfg.data.get("skip_decode", ()))
  if cfg.get("cache_raw", False):
    ds = ds.cache()
  ds = _with_example_seeds(ds, cfg.get("seed", 0))  # In case pp is random.
  ds = _map_pp(ds, lambda ex: {**pp(ex), MASK_KEY: tf.constant(True)}, cfg.pp)
  ds = ds.concatenate(_padding(ds.element_spec).map(
      lambda ex: {**ex, MASK_KEY: tf.constant(False)}))
  ds = ds.take(num_batches * local_bs).batch(local_bs, drop_remainder=True)
  if cfg.get("cache_final", False):
    ds = ds.cache()
  ds = ds.prefetch(cfg.get("prefetch", 2))
  return _deterministic(ds), sum(sizes)


def _batch_sharding(devices_or_sharding) -> jax.sharding.Sharding:
  if isinstance(devices_or_sharding, jax.sharding.Sharding):
    return devices_or_sharding
  devices = np.asarray(devices_or_sharding)
  if devices.ndim != 1 or not devices.size:
    raise ValueError(f"Expected a jax.sharding.Sharding or a non-empty flat "
                     f"sequence of devices, got {devices_or_sharding!r}.")
  mesh = jax.sharding.Mesh(devices, ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


class _Prefetch(Iterator):
  """Runs an iterator in a background thread, `size` items ahead."""

  _DONE = object()

  def __init__(self, iterator: Iterator, size: int):
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(iterator,),
                                    daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def _produce(self, iterator):
    try:
      for item in iterator:
        if not self._put(item):
          return
    except Exception as e:  # Re-raised in the consumer thread.
      self._put(e)
      return
    self._put(self._DONE)

  def __next__(self):
    if self._stop.is_set():
      raise StopIteration
    item = self._queue.get()
    if item is self._DONE:
      self._stop.set()
      raise StopIteration
    if isinstance(item, Exception):
      self._stop.set()
      raise item
    return item

  def close(self):
    """Stops the background thread (it finishes its current item)."""
    self._stop.set()
    self._thread.join(timeout=10)


def start_global(dataset: tf.data.Dataset | Iterable[Any],
                 devices_or_sharding: Sequence[jax.Device] | jax.sharding.Sharding,
                 n_prefetch: int = 1) -> Iterator[Any]:
  """Iterates global batches built from this process's local batches.

  Every numeric array of a local batch becomes a global `jax.Array` whose
  first (batch) dimension is the concatenation over processes, laid out by
  `devices_or_sharding`: a Sharding, or devices to shard the batch over.
  String arrays (e.g. file names) stay local numpy arrays. With
  `n_prefetch` > 0 a background thread keeps that many batches ready on
  device; the returned iterator then has a `close()` method. To resume, skip
  batches in `training(..., skip_batches=n)` (see the module docstring).
  """
  sharding = _batch_sharding(devices_or_sharding)

  def _to_global(x):
    x = np.asarray(x)
    if x.dtype.kind in "OSU":  # jax has no string arrays.
      return x
    return jax.make_array_from_process_local_data(sharding, x)

  batches = (dataset.as_numpy_iterator() if isinstance(dataset, tf.data.Dataset)
             else iter(dataset))
  it = (jax.tree.map(_to_global, batch) for batch in batches)
  return _Prefetch(it, n_prefetch) if n_prefetch > 0 else it
