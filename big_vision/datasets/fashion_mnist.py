"""TFDS builder `fashion_mnist_local`: Fashion-MNIST from local IDX files.

Reads the four gzipped IDX files shipped by Debian's `dataset-fashion-mnist`
package (or any directory holding the same files), so no download is needed.
The source directory is, in order of precedence: the builder's `source_dir=`
keyword, the FASHION_MNIST_DIR environment variable, or
/usr/share/datasets/fashion-mnist.

Examples are written in the IDX order (shuffling disabled) so example i of a
split is record i of the IDX file; training pipelines shuffle anyway.
"""
import gzip
import io
import os

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
SOURCE_DIR_ENV = "FASHION_MNIST_DIR"

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
               "Shirt", "Sneaker", "Bag", "Ankle boot")

# split -> (images file, labels file), as named by the original distribution.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes with `ndim` dimensions."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  header_len = 4 * (1 + ndim)
  found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
  if found != magic:
    raise ValueError(f"{path}: IDX magic number is {found}, expected {magic} "
                     f"(uint8 data with {ndim} dimension(s)). Is this the "
                     "right, uncorrupted file?")
  if len(raw) < header_len:
    raise ValueError(f"{path}: file too short ({len(raw)} bytes) for an IDX "
                     "header.")
  header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
  shape = tuple(int(d) for d in header[1:])
  data = np.frombuffer(raw, dtype=np.uint8, offset=header_len)
  if data.size != np.prod(shape):
    raise ValueError(f"{path}: header says shape {shape} "
                     f"({np.prod(shape)} bytes) but {data.size} bytes follow.")
  return data.reshape(shape)


def read_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28], labels uint8 [N]) of a split."""
  images_file, labels_file = FILES[split]
  images = _read_idx(os.path.join(source_dir, images_file), _IMAGES_MAGIC, 3)
  labels = _read_idx(os.path.join(source_dir, labels_file), _LABELS_MAGIC, 1)
  if len(images) != len(labels):
    raise ValueError(f"{source_dir}: {len(images)} images but {len(labels)} "
                     f"labels in the {split} split.")
  return images, labels


def resolve_source_dir(source_dir: str | None = None) -> str:
  """Returns the source directory, checking that all four files are there."""
  source_dir = source_dir or os.environ.get(SOURCE_DIR_ENV) or DEFAULT_SOURCE_DIR
  missing = [f for pair in FILES.values() for f in pair
             if not os.path.isfile(os.path.join(source_dir, f))]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST files {missing} not found in {source_dir!r}. Install "
        "them with `sudo apt-get install dataset-fashion-mnist` (into "
        f"{DEFAULT_SOURCE_DIR}), or pass the directory holding them as "
        f"`source_dir=` or in the {SOURCE_DIR_ENV} environment variable.")
  return source_dir


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image, mode="L").save(buf, format="PNG")
  return buf.getvalue()


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (28x28 grayscale, 10 classes) from local IDX files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from the IDX files of the Debian package."}
  # TFDS derives `code_path` via `importlib_resources`, which TFDS >= 4.9.9
  # needs but does not declare on Python >= 3.9 (tensorflow/datasets#11212).
  code_path = epath.Path(__file__)

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    # Only read when generating; a prepared dataset needs no source files.
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST: Zalando article images, 28x28 grayscale, "
                    "10 classes; 60000 train and 10000 test examples.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1), dtype=np.uint8,
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        disable_shuffling=True,  # Keep the IDX order (see module docstring).
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    source_dir = resolve_source_dir(self._source_dir)
    return {split: self._generate_examples(source_dir, split) for split in FILES}

  def _generate_examples(self, source_dir, split):
    images, labels = read_split(source_dir, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      # PNG-encode here with PIL: much faster than TFDS's per-image TF graph.
      yield i, {"image": _png(image), "label": int(label)}
