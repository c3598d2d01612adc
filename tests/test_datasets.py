"""Tests for big_vision/datasets: fashion_mnist_local and image_folder_local."""
import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import big_vision.datasets as bv_datasets
from big_vision.config_parsing import ConfigError
from big_vision.datasets import fashion_mnist

SRC = fashion_mnist.DEFAULT_SOURCE_DIR
needs_debian_files = pytest.mark.skipif(
    not os.path.isdir(SRC),
    reason="needs `sudo apt-get install dataset-fashion-mnist`")


def raw_idx(name: str) -> np.ndarray:
  """Independent minimal IDX reader (does not reuse the builder's parser)."""
  with gzip.open(os.path.join(SRC, name)) as f:
    raw = f.read()
  ndim = raw[3]
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="session")
def fashion_builder(tmp_path_factory):
  # Same folder as in test_input_pipeline.py, so one session builds it once.
  data_dir = tmp_path_factory.getbasetemp() / "tfds_fashion_mnist"
  return bv_datasets.prepare("fashion_mnist_local", data_dir=str(data_dir))


def read_split(builder, split):
  """(encoded images, labels) in stored order, without decoding."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  images, labels = [], []
  for ex in ds.as_numpy_iterator():
    images.append(ex["image"])
    labels.append(ex["label"])
  return images, np.array(labels)


# --- fashion_mnist_local. ---------------------------------------------------


@needs_debian_files
def test_fashion_mnist_info(fashion_builder):
  info = fashion_builder.info
  assert info.name == "fashion_mnist_local" and str(info.version) == "1.0.0"
  assert info.splits["train"].num_examples == 60000
  assert info.splits["test"].num_examples == 10000
  assert info.features["image"].shape == (28, 28, 1)
  assert info.features["image"].np_dtype == np.uint8
  assert info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
  # Registered with TFDS, and prepared data is found again by name.
  again = tfds.builder("fashion_mnist_local",
                       data_dir=fashion_builder.data_dir_root)
  assert again.is_prepared()


@needs_debian_files
@pytest.mark.parametrize("split,prefix", [("test", "t10k"), ("train", "train")])
def test_fashion_mnist_matches_raw_idx(fashion_builder, split, prefix):
  images, labels = read_split(fashion_builder, split)
  raw_labels = raw_idx(f"{prefix}-labels-idx1-ubyte.gz")
  np.testing.assert_array_equal(labels, raw_labels)  # All, in order.
  raw_images = raw_idx(f"{prefix}-images-idx3-ubyte.gz")
  for i in (0, 1, len(raw_images) - 1):
    decoded = tf.io.decode_png(images[i]).numpy()
    np.testing.assert_array_equal(decoded[..., 0], raw_images[i])


@needs_debian_files
def test_fashion_mnist_first_test_example_is_an_ankle_boot(fashion_builder):
  ex = next(iter(fashion_builder.as_dataset(split="test", shuffle_files=False)))
  assert fashion_mnist.CLASS_NAMES[int(ex["label"])] == "Ankle boot"
  assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == tf.uint8
  np.testing.assert_array_equal(ex["image"].numpy()[..., 0],
                                raw_idx("t10k-images-idx3-ubyte.gz")[0])


def test_fashion_mnist_missing_dir_says_how_to_install(tmp_path):
  missing = str(tmp_path / "nowhere")
  builder = fashion_mnist.FashionMnistLocal(source_dir=missing,
                                            data_dir=str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError) as e:
    builder.download_and_prepare()
  msg = str(e.value)
  assert "sudo apt-get install dataset-fashion-mnist" in msg
  assert missing in msg and "FASHION_MNIST_DIR" in msg
  assert "train-images-idx3-ubyte.gz" in msg


def test_fashion_mnist_env_var_sets_source_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "from_env"))
  with pytest.raises(FileNotFoundError, match="from_env"):
    fashion_mnist.resolve_source_dir()
  # An explicit directory beats the environment variable.
  with pytest.raises(FileNotFoundError, match="explicit"):
    fashion_mnist.resolve_source_dir(str(tmp_path / "explicit"))


def _write_idx(path, magic, array):
  header = struct.pack(">" + "I" * (1 + array.ndim), magic, *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_idx_parser_reads_small_files_and_checks_magic(tmp_path):
  images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, images)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.array([7, 1]))
  got_images, got_labels = fashion_mnist.read_split(str(tmp_path), "test")
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, [7, 1])

  # Labels where images are expected: magic 2049 instead of 2051.
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2049, np.array([7, 1]))
  with pytest.raises(ValueError, match="magic number is 2049, expected 2051"):
    fashion_mnist.read_split(str(tmp_path), "test")


def test_idx_parser_detects_truncated_data(tmp_path):
  path = tmp_path / "x.gz"
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">IIII", 2051, 2, 3, 4) + bytes(5))
  with pytest.raises(ValueError, match=r"shape \(2, 3, 4\)"):
    fashion_mnist._read_idx(str(path), 2051, 3)


# --- image_folder_local. ----------------------------------------------------


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)
  return array


def _labelled_tree(root):
  """train/{cat,dog}, test/{cat,dog}; pixel values identify each file."""
  written = {}
  for split, n in (("train", 3), ("test", 1)):
    for c, cls in enumerate(("dog", "cat")):  # Unsorted on purpose.
      for i in range(n):
        rel = os.path.join(cls, f"{i}.png")
        value = 10 * c + i + (100 if split == "test" else 0)
        written[(split, rel)] = _save(
            os.path.join(root, split, rel),
            np.full((4 + i, 5, 3), value, np.uint8))
  return written


def _examples(builder, split):
  return {ex["file_name"].decode(): ex
          for ex in builder.as_dataset(split=split).as_numpy_iterator()}


def test_image_folder_with_classes_and_test_split(tmp_path):
  src = tmp_path / "src"
  written = _labelled_tree(str(src))
  # Non-images and hidden files are ignored; nested folders are walked.
  (src / "train" / "cat" / "notes.txt").write_text("x")
  _save(str(src / "train" / "cat" / ".hidden.png"), np.zeros((2, 2), np.uint8))
  written[("train", "cat/sub/gray.png")] = _save(
      str(src / "train" / "cat" / "sub" / "gray.png"),
      np.full((3, 3), 55, np.uint8))

  builder = bv_datasets.prepare("image_folder_local", str(tmp_path / "tfds"),
                                source_dir=str(src))
  assert builder.info.features["label"].names == ["cat", "dog"]
  assert builder.info.splits["train"].num_examples == 7
  assert builder.info.splits["test"].num_examples == 2
  for split in ("train", "test"):
    examples = _examples(builder, split)
    expected = {rel: a for (s, rel), a in written.items() if s == split}
    assert sorted(examples) == sorted(expected)
    for rel, array in expected.items():
      ex = examples[rel]
      assert ex["label"] == ["cat", "dog"].index(rel.split("/")[0])
      rgb = array if array.ndim == 3 else np.repeat(array[..., None], 3, -1)
      np.testing.assert_array_equal(ex["image"], rgb)


def test_image_folder_reopens_without_source_and_guards_data_dir(tmp_path, monkeypatch):
  monkeypatch.delenv("IMAGE_FOLDER_DIR", raising=False)
  src = tmp_path / "src"
  _labelled_tree(str(src))
  data_dir = str(tmp_path / "tfds")
  bv_datasets.prepare("image_folder_local", data_dir, source_dir=str(src))
  # Reading back needs no source: features come from the prepared copy.
  again = tfds.builder("image_folder_local", data_dir=data_dir)
  assert again.info.features["label"].names == ["cat", "dog"]
  assert len(_examples(again, "test")) == 2
  # So does naming the folder it was prepared from.
  same = tfds.builder("image_folder_local", data_dir=data_dir, source_dir=str(src))
  assert len(_examples(same, "test")) == 2
  # Another source folder for the same data_dir is refused, when preparing and when only
  # reading (it would serve the old folder's images), with one line saying what to do.
  other = tmp_path / "other"
  _save(str(other / "a.png"), np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(ConfigError, match="one prepared folder per data_dir") as e:
    bv_datasets.prepare("image_folder_local", data_dir, source_dir=str(other))
  assert f"prepared from {str(src)!r}, not {str(other)!r}" in str(e.value)
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="one prepared folder per data_dir"):
    tfds.builder("image_folder_local", data_dir=data_dir, source_dir=str(other))
  # The environment variable counts as naming a folder.
  monkeypatch.setenv("IMAGE_FOLDER_DIR", str(other))
  with pytest.raises(ConfigError, match="IMAGE_FOLDER_DIR"):
    tfds.builder("image_folder_local", data_dir=data_dir)


def test_image_folder_without_classes_has_no_label(tmp_path, monkeypatch):
  src = tmp_path / "flat"
  arrays = {f"{i}.png": _save(str(src / f"{i}.png"),
                              np.full((2, 3, 3), i, np.uint8))
            for i in range(3)}
  jpeg = np.full((8, 8, 3), 200, np.uint8)
  Image.fromarray(jpeg).save(src / "photo.JPG", quality=95)
  monkeypatch.setenv("IMAGE_FOLDER_DIR", str(src))  # Source from the env.
  builder = bv_datasets.prepare("image_folder_local", str(tmp_path / "tfds"))
  assert "label" not in builder.info.features.keys()
  assert builder.info.supervised_keys is None
  assert list(builder.info.splits) == ["train"]
  examples = _examples(builder, "train")
  assert sorted(examples) == ["0.png", "1.png", "2.png", "photo.JPG"]
  for name, array in arrays.items():
    np.testing.assert_array_equal(examples[name]["image"], array)
  np.testing.assert_allclose(examples["photo.JPG"]["image"], jpeg, atol=2)


@pytest.mark.parametrize("layout,error", [
    ({"test/a/0.png": 1}, "test/ folder but no train/"),
    ({"a/0.png": 1, "loose.png": 1}, "mixes class sub-folders"),
    ({"train/a/0.png": 1, "test/0.png": 1}, "disagree on having class"),
    ({"notes.txt": 0}, "No .png/.jpg/.jpeg images"),
    ({"a/broken.png": 0}, "Cannot read image"),
])
def test_image_folder_layout_errors(tmp_path, layout, error):
  src = tmp_path / "src"
  for rel, valid in layout.items():
    path = src / rel
    if valid:
      _save(str(path), np.zeros((2, 2), np.uint8))
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(b"not an image")
  with pytest.raises(ValueError, match=error):
    bv_datasets.prepare("image_folder_local", str(tmp_path / "tfds"),
                        source_dir=str(src))


def test_image_folder_needs_a_source_when_not_prepared(tmp_path, monkeypatch):
  monkeypatch.delenv("IMAGE_FOLDER_DIR", raising=False)
  # A ConfigError: train.py prints it as one line, without a traceback.
  with pytest.raises(ConfigError, match="data.source_dir .* or IMAGE_FOLDER_DIR"):
    tfds.builder("image_folder_local", data_dir=str(tmp_path))


def test_prepare_rejects_non_local_datasets(tmp_path):
  with pytest.raises(ValueError, match="tfds build"):
    bv_datasets.prepare("imagenet2012", str(tmp_path))
