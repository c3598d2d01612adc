"""Tests for big_vision/input_pipeline.py.

Multi-process runs are simulated by monkeypatching `jax.process_index` and
`jax.process_count`, which the pipeline reads at call time.
"""
import collections
import hashlib
import os
import subprocess
import sys
import textwrap
import types

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import big_vision.datasets as bv_datasets
from big_vision import input_pipeline
from big_vision.config_parsing import ConfigError
from big_vision.evaluators import common as eval_common

NUM_FOLDER_IMAGES = 23  # Odd on purpose: uneven process shards.
FASHION_PP = ('decode(1)|value_range(-1, 1)|onehot(10, key_result="labels")'
              '|keep("image", "labels")')
FOLDER_PP = 'decode|resize(4)|keep("image", "label", "file_name")'


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
  # Same folder as in test_datasets.py, so one session builds it once.
  data_dir = tmp_path_factory.getbasetemp() / "tfds_fashion_mnist"
  bv_datasets.prepare("fashion_mnist_local", data_dir=str(data_dir))
  return str(data_dir)


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory):
  """image_folder_local with 23 images; image i is filled with value i."""
  src = tmp_path_factory.mktemp("images")
  for i in range(NUM_FOLDER_IMAGES):
    cls = src / ("even" if i % 2 == 0 else "odd")
    cls.mkdir(exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(cls / f"{i:02d}.png")
  data_dir = str(tmp_path_factory.mktemp("tfds_folder"))
  bv_datasets.prepare("image_folder_local", data_dir, source_dir=str(src))
  return data_dir


def make_config(name, split, data_dir, pp, batch_size, **kwargs):
  config = ml_collections.ConfigDict()
  config.data = dict(name=name, split=split, data_dir=data_dir)
  config.pp = pp
  config.batch_size = batch_size
  config.shuffle_buffer_size = kwargs.pop("shuffle_buffer_size", 100)
  config.cache_raw = kwargs.pop("cache_raw", False)
  config.prefetch = 1
  config.update(kwargs)
  return config


def simulate_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)
  # No distributed runtime behind the simulated processes: process 0's word is "done".
  monkeypatch.setattr(input_pipeline.multihost_utils, "broadcast_one_to_all", lambda x: 1)


def take(ds, n):
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(n)]


def names(batches):
  return [n.decode() for b in batches for n in b["file_name"]]


# --- Dataset builders. ------------------------------------------------------


def test_get_dataset_builder_unprepared_tfds_dataset_is_one_clear_line(
    tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    input_pipeline.get_dataset_builder("imagenet2012", data_dir=str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg
  assert "'imagenet2012' is not prepared" in msg and str(tmp_path) in msg
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in msg


def test_get_dataset_builder_unknown_name(tmp_path):
  with pytest.raises(ValueError, match="fashion_mnist_local"):
    input_pipeline.get_dataset_builder("no_such_dataset_xyz", str(tmp_path))


def test_get_dataset_builder_unknown_name_is_a_config_error(tmp_path):
  # A ConfigError: train.py's main prints it as one line, without a traceback.
  with pytest.raises(ConfigError) as e:
    input_pipeline.get_dataset_builder("imagenet2021", str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("unknown dataset 'imagenet2021': neither one of ours "
                        "(fashion_mnist_local, image_folder_local) nor a TFDS dataset")
  assert "imagenet2012" in msg  # The closest TFDS names.


def test_get_dataset_builder_honours_tfds_data_dir(fashion_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", fashion_dir)
  builder = input_pipeline.get_dataset_builder("fashion_mnist_local")
  assert builder.data_dir.startswith(fashion_dir)
  assert builder.info.splits["test"].num_examples == 10000


# --- The builder's arguments in the data config. ------------------------------


def _image_folder(root, values):
  """A labelled image folder: one 6x6 image per value, filled with it, in class "c<v%3>"."""
  for v in values:
    os.makedirs(root / f"c{v % 3}", exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), v, np.uint8)).save(root / f"c{v % 3}" / f"{v:03d}.png")
  return str(root)


def test_source_dir_in_the_data_config_reaches_the_builder(tmp_path, monkeypatch):
  # The README's way: data.source_dir, no IMAGE_FOLDER_DIR, a data_dir not yet prepared.
  monkeypatch.delenv("IMAGE_FOLDER_DIR", raising=False)
  src = _image_folder(tmp_path / "a", range(10, 19))
  config = make_config("image_folder_local", "train", str(tmp_path / "tfds"), FOLDER_PP,
                       batch_size=3)
  config.data.source_dir = src
  assert input_pipeline.num_classes(config.data) == 3  # (train.py asks this first.)
  ds, num_examples = input_pipeline.training(config)
  assert num_examples == 9
  assert {int(n.split("/")[1][:3]) for n in names(take(ds, 3))} == set(range(10, 19))
  ds, num_examples = input_pipeline.evaluation(config)
  assert num_examples == 9 and len(names(list(ds.as_numpy_iterator()))) == 9
  # A None value leaves the builder its default (here: the prepared copy).
  config.data.source_dir = None
  assert input_pipeline.training(config)[1] == 9


def test_another_source_dir_for_a_prepared_data_dir_is_one_config_error(tmp_path,
                                                                        monkeypatch):
  # Not a silent run on the images of the folder the data_dir was prepared from.
  monkeypatch.delenv("IMAGE_FOLDER_DIR", raising=False)
  a = _image_folder(tmp_path / "a", range(10, 19))
  b = _image_folder(tmp_path / "b", range(50, 54))
  config = make_config("image_folder_local", "train", str(tmp_path / "tfds"), FOLDER_PP,
                       batch_size=3)
  config.data.source_dir = a
  assert input_pipeline.training(config)[1] == 9
  config.data.source_dir = b
  for call in (lambda: input_pipeline.num_classes(config.data),
               lambda: input_pipeline.training(config),
               lambda: input_pipeline.evaluation(config)):
    with pytest.raises(ConfigError, match="one prepared folder per data_dir") as e:
      call()
    assert f"prepared from {a!r}, not {b!r}" in str(e.value) and "\n" not in str(e.value)
  # Its own data_dir prepares folder b.
  config.data.data_dir = str(tmp_path / "tfds_b")
  assert input_pipeline.training(config)[1] == 4


@pytest.mark.parametrize("name,key,allowed", [
    ("image_folder_local", "sorce_dir", "(config, file_format, source_dir, version)"),
    ("fashion_mnist_local", "shuffle", "(config, file_format, source_dir, version)"),
    ("imagenet2012", "source_dir", "(config, file_format, version)"),
])
def test_a_data_key_the_builder_does_not_take_is_one_config_error(tmp_path, name, key,
                                                                  allowed):
  config = make_config(name, "train", str(tmp_path), FOLDER_PP, batch_size=3)
  config.data[key] = "x"
  expected = (f"data.{key}='x': dataset {name!r} takes no argument {key}; data's keys are "
              f"name, split, data_dir, skip_decode and the builder's arguments {allowed}")
  for call in (lambda: input_pipeline.num_classes(config.data),
               lambda: input_pipeline.training(config),
               lambda: input_pipeline.evaluation(config)):
    with pytest.raises(ConfigError) as e:
      call()
    assert str(e.value) == expected


def test_evals_without_data_of_their_own_get_the_training_builder_arguments(tmp_path,
                                                                            monkeypatch):
  monkeypatch.delenv("IMAGE_FOLDER_DIR", raising=False)
  src = _image_folder(tmp_path / "a", range(10, 19))
  config = ml_collections.ConfigDict(dict(
      input=make_config("image_folder_local", "train", str(tmp_path / "tfds"), FOLDER_PP,
                        batch_size=4),
      eval_split="train"))
  config.input.data.source_dir = src
  context = types.SimpleNamespace(
      config=config, mesh=types.SimpleNamespace(devices=np.empty(1, object)))
  got = eval_common.eval_input_config(context)
  assert got["data"] == dict(name="image_folder_local", split="train",
                             data_dir=str(tmp_path / "tfds"), source_dir=src)
  assert input_pipeline.evaluation(ml_collections.ConfigDict(got))[1] == 9
  # An eval naming its own dataset does not get them.
  got = eval_common.eval_input_config(context, data=dict(name="fashion_mnist_local"))
  assert got["data"] == dict(name="fashion_mnist_local", split="train")


# --- Training. ---------------------------------------------------------------


def test_training_batches_on_fashion_mnist(fashion_dir):
  config = make_config("fashion_mnist_local", "train", fashion_dir, FASHION_PP,
                       batch_size=32)
  ds, num_examples = input_pipeline.training(config, seed=1)
  assert num_examples == 60000
  batch = take(ds, 1)[0]
  assert sorted(batch) == ["image", "labels"]
  assert batch["image"].shape == (32, 28, 28, 1)
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert batch["image"].min() == -1  # Fashion-MNIST has black backgrounds.
  assert batch["labels"].shape == (32, 10)
  np.testing.assert_array_equal(batch["labels"].sum(1), 1)


def test_training_batch_is_a_shuffled_set_of_real_examples(fashion_dir):
  config = make_config("fashion_mnist_local", "test[:64]", fashion_dir,
                       'decode(1)|keep("image", "label")', batch_size=64,
                       shuffle_buffer_size=64)
  batch = take(input_pipeline.training(config)[0], 1)[0]
  builder = tfds.builder("fashion_mnist_local", data_dir=fashion_dir)
  raw = list(builder.as_dataset(split="test[:64]").as_numpy_iterator())
  digest = lambda image, label: hashlib.md5(image.tobytes()).hexdigest() + str(label)
  assert (sorted(digest(i, l) for i, l in zip(batch["image"], batch["label"]))
          == sorted(digest(ex["image"], ex["label"]) for ex in raw))
  assert [int(l) for l in batch["label"]] != [int(ex["label"]) for ex in raw]


RANDOM_PP = ('decode(1)|pad(32)|random_crop(28)|flip_lr'
             '|keep("image", "label")')


def test_training_is_deterministic_and_resumable(fashion_dir):
  config = make_config("fashion_mnist_local", "test[:200]", fashion_dir,
                       RANDOM_PP, batch_size=16, seed=3)
  first = take(input_pipeline.training(config)[0], 4)
  again = take(input_pipeline.training(config)[0], 4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Resuming after 3 batches gives exactly the 4th batch, augmentations too.
  resumed = take(input_pipeline.training(config, skip_batches=3)[0], 1)[0]
  np.testing.assert_array_equal(resumed["image"], first[3]["image"])
  # An explicit seed overrides config.seed.
  explicit = take(input_pipeline.training(config, seed=3)[0], 1)[0]
  np.testing.assert_array_equal(explicit["image"], first[0]["image"])
  # Another seed shuffles and augments differently.
  config.seed = 4
  other = take(input_pipeline.training(config)[0], 1)[0]
  assert not np.array_equal(other["image"], first[0]["image"])


def test_pp_without_decode_and_skip_decode(fashion_dir):
  # TFDS decodes images by default, so pp strings need no `decode`...
  config = make_config("fashion_mnist_local", "test[:40]", fashion_dir,
                       "flip_lr|value_range(-1, 1)|keep('image', 'label')",
                       batch_size=8, cache_raw=True)
  batch = take(input_pipeline.training(config, seed=0)[0], 1)[0]
  assert batch["image"].shape == (8, 28, 28, 1)
  # ... while skip_decode hands the PNG bytes to pp, which must decode them.
  config.data.skip_decode = ("image",)
  with pytest.raises(ValueError, match="flip_lr: 'image' is still an encoded"):
    take(input_pipeline.training(config, seed=0)[0], 1)
  config.pp = "decode(1)|" + config.pp
  again = take(input_pipeline.training(config, seed=0)[0], 1)[0]
  np.testing.assert_array_equal(again["image"], batch["image"])
  # A ConfigError: train.py prints it as one line, without a traceback.
  config.data.skip_decode = ("label",)
  with pytest.raises(ConfigError, match=r"data.skip_decode=\('label',\): \['label'\] are "
                     r"not image features of fashion_mnist_local; those are \['image'\]"):
    input_pipeline.training(config)


@pytest.mark.parametrize("pp,message", [
    ("valu_range(-1, 1)|keep('image', 'label')",
     r"pp=\"valu_range\(-1, 1\)\|keep\('image', 'label'\)\": Unknown preprocessing op "
     r"'valu_range'"),
    ("value_range(-1, 1)|keep('image', 'lable')",
     r"pp=.* fails on the features \['image', 'label'\]: .*keep: example has no key\(s\) "
     r"\['lable'\]"),
])
def test_a_bad_pp_is_one_config_error_when_the_pipeline_is_built(fashion_dir, pp, message):
  config = make_config("fashion_mnist_local", "test[:40]", fashion_dir, pp, batch_size=8)
  for build in (input_pipeline.training, input_pipeline.evaluation):
    with pytest.raises(ConfigError, match=message):
      build(config)


def test_cache_raw_gives_the_same_stream(fashion_dir):
  config = make_config("fashion_mnist_local", "test[:50]", fashion_dir,
                       RANDOM_PP, batch_size=8)
  plain = take(input_pipeline.training(config)[0], 9)  # > 1 epoch.
  config.cache_raw = True
  cached = take(input_pipeline.training(config)[0], 9)
  for a, b in zip(plain, cached):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_training_batch_must_divide_by_process_count(fashion_dir, monkeypatch):
  simulate_process(monkeypatch, 0, 3)
  config = make_config("fashion_mnist_local", "test", fashion_dir, FASHION_PP,
                       batch_size=32)
  with pytest.raises(ValueError, match=r"batch_size=32.*processes \(3\)"):
    input_pipeline.training(config)


def test_training_processes_read_disjoint_shards(folder_dir, monkeypatch):
  seen = {}
  for index, shard_size in ((0, 12), (1, 11)):
    simulate_process(monkeypatch, index, 2)
    config = make_config("image_folder_local", "train", folder_dir, FOLDER_PP,
                         batch_size=2)  # 1 example per process and batch.
    ds, num_examples = input_pipeline.training(config)
    assert num_examples == NUM_FOLDER_IMAGES  # Whole split, all processes.
    # The first epoch is a permutation of this process's shard...
    epoch = names(take(ds, shard_size))
    assert len(set(epoch)) == shard_size
    # ... and the next one starts over with the same shard.
    assert set(names(take(ds, 2 * shard_size))) == set(epoch)
    seen[index] = set(epoch)
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == NUM_FOLDER_IMAGES


def test_shard_split_validates_index():
  with pytest.raises(ValueError, match="process_index=2"):
    input_pipeline.shard_split("train", 2, 2)


# --- Evaluation. -------------------------------------------------------------


@pytest.mark.parametrize("count,global_batch,num_batches",
                         [(1, 5, 5), (2, 8, 3), (3, 3, 8)])
def test_evaluation_covers_every_example_once(folder_dir, monkeypatch, count,
                                              global_batch, num_batches):
  counts = collections.Counter()
  for index in range(count):
    simulate_process(monkeypatch, index, count)
    config = make_config("image_folder_local", "train", folder_dir, FOLDER_PP,
                         batch_size=global_batch)
    ds, num_examples = input_pipeline.evaluation(config)
    assert num_examples == NUM_FOLDER_IMAGES
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == num_batches  # Same number on every process.
    for b in batches:
      assert b["image"].shape == (global_batch // count, 4, 4, 3)
      mask = b["_mask"]
      assert mask.dtype == bool
      for name, image, label, real in zip(b["file_name"], b["image"],
                                          b["label"], mask):
        if real:
          counts[name.decode()] += 1
          value = int(name.decode().split("/")[1][:2])
          np.testing.assert_array_equal(image, value)  # Right pixels...
          assert label == value % 2  # ... and label (["even", "odd"]).
        else:  # Padding is all zeros.
          assert not image.any() and name == b"" and label == 0
  assert len(counts) == NUM_FOLDER_IMAGES
  assert set(counts.values()) == {1}


def test_evaluation_needs_fixed_shapes(folder_dir):
  config = make_config("image_folder_local", "train", folder_dir,
                       'decode|keep("image")', batch_size=4)
  with pytest.raises(ValueError, match="resize"):
    input_pipeline.evaluation(config)


# --- start_global. ----------------------------------------------------------


def test_start_global_makes_sharded_jax_arrays(folder_dir):
  devices = jax.devices()
  batch = 2 * len(devices)
  config = make_config("image_folder_local", "train", folder_dir, FOLDER_PP,
                       batch_size=batch)
  ds, _ = input_pipeline.evaluation(config)
  expected = list(ds.as_numpy_iterator())
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), ("batch",)),
      jax.sharding.PartitionSpec("batch"))
  for arg in (sharding, devices):
    it = input_pipeline.start_global(ds, arg, n_prefetch=2)
    got = list(it)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
      assert isinstance(g["image"], jax.Array)
      assert g["image"].sharding.is_equivalent_to(sharding, 4)
      assert g["image"].shape == e["image"].shape
      np.testing.assert_array_equal(np.asarray(g["image"]), e["image"])
      np.testing.assert_array_equal(np.asarray(g["_mask"]), e["_mask"])
      # Strings cannot be jax arrays; they stay local numpy arrays.
      assert isinstance(g["file_name"], np.ndarray)
      np.testing.assert_array_equal(g["file_name"], e["file_name"])


def test_start_global_reraises_producer_errors():
  def batches():
    yield {"x": np.zeros(2)}
    raise RuntimeError("broken input")
  it = input_pipeline.start_global(batches(), jax.devices()[:1], n_prefetch=1)
  assert next(it)["x"].shape == (2,)
  with pytest.raises(RuntimeError, match="broken input"):
    next(it)


def test_start_global_shards_over_several_devices():
  # Needs several devices, so run a fresh process with 4 fake CPU devices.
  code = textwrap.dedent("""
      import jax, numpy as np
      from big_vision import input_pipeline
      local = [{"x": np.arange(8 * 3).reshape(8, 3)} for _ in range(2)]
      it = input_pipeline.start_global(local, jax.devices(), n_prefetch=1)
      for g in it:
        assert len(jax.devices()) == 4
        shards = sorted(g["x"].addressable_shards, key=lambda s: s.index[0].start)
        assert [s.data.shape for s in shards] == [(2, 3)] * 4
        for k, s in enumerate(shards):
          np.testing.assert_array_equal(np.asarray(s.data), local[0]["x"][2*k:2*k+2])
      print("OK")
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  out = subprocess.run([sys.executable, "-c", code], env=env, timeout=120,
                       capture_output=True, text=True)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


# --- imagenet2012 through mocked TFDS. --------------------------------------


def write_fake_metadata(data_dir, name, num_examples, splits):
  """Writes dataset_info.json/features.json as if `name` were prepared."""
  builder = tfds.builder(name, data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_path, dataset_name=name, filetype_suffix="tfrecord",
      template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0,
                          filename_template=template.replace(split=s))
      for s in splits]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


@pytest.mark.parametrize("skip_decode", [(), ("image",)])
def test_imagenet_pipeline_on_mock_data(tmp_path, skip_decode):
  write_fake_metadata(str(tmp_path), "imagenet2012", 16,
                      ("train", "validation"))
  config = make_config(
      "imagenet2012", "train", str(tmp_path),
      'decode_jpeg_and_inception_crop(64)|flip_lr|value_range(-1, 1)'
      '|keep("image", "label")', batch_size=8)
  config.data.skip_decode = skip_decode
  with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    ds, num_examples = input_pipeline.training(config)
    batches = take(ds, 3)  # Mock data is random JPEGs of random sizes.
  assert num_examples == 16
  for b in batches:
    assert sorted(b) == ["image", "label"]
    assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.float32
    assert -1 <= b["image"].min() < b["image"].max() <= 1
    assert b["label"].dtype == np.int64
    assert ((0 <= b["label"]) & (b["label"] < 1000)).all()


@pytest.mark.parametrize("index,fails", [(0, False), (1, False), (0, True), (1, True)])
def test_several_processes_prepare_our_dataset_process_zero_first(monkeypatch, index, fails):
  # On a shared data_dir the others must find it prepared, not write the same files at
  # once. If process 0 fails, it still reaches the collective and tells the others, who
  # stop too: none waits forever or starts writing.
  calls = []

  def prepare(name, data_dir, **kw):
    calls.append("prepare")
    if fails and index == 0:
      raise FileNotFoundError("no IDX files")
    return "builder"

  def broadcast(ok):  # Process 0's value reaches everyone.
    calls.append("broadcast")
    return ok if index == 0 else int(not fails)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(input_pipeline.datasets, "prepare", prepare)
  monkeypatch.setattr(input_pipeline.multihost_utils, "broadcast_one_to_all", broadcast)
  if fails:
    with pytest.raises((FileNotFoundError, RuntimeError), match="IDX|process 0 could not"):
      input_pipeline.get_dataset_builder("fashion_mnist_local", "/data")
  else:
    assert input_pipeline.get_dataset_builder("fashion_mnist_local", "/data") == "builder"
  expected = ["prepare", "broadcast"] if index == 0 else ["broadcast"] + ["prepare"] * (not fails)
  assert calls == expected
