"""Local TFDS builders. Importing this package registers them with TFDS, so
`tfds.builder("fashion_mnist_local", data_dir=...)` works afterwards.

Builders:
  fashion_mnist_local: Fashion-MNIST from the Debian IDX files.
  image_folder_local:  a folder of PNG/JPEG images (needs `source_dir=`).
"""
import tensorflow_datasets as tfds

from big_vision.datasets.fashion_mnist import FashionMnistLocal
from big_vision.datasets.image_folder import ImageFolderLocal

BUILDERS = {
    "fashion_mnist_local": FashionMnistLocal,
    "image_folder_local": ImageFolderLocal,
}


def base_name(name: str) -> str:
  """'fashion_mnist_local:1.0.0' or '.../config' -> 'fashion_mnist_local'."""
  return name.split(":")[0].split("/")[0]


def prepare(name: str, data_dir: str | None = None,
            **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Builds local dataset `name` into `data_dir` unless it is there already.

  `data_dir` defaults to TFDS's (TFDS_DATA_DIR or ~/tensorflow_datasets).
  `builder_kwargs` go to the builder, e.g. `source_dir=` for image folders.
  Returns the prepared builder.
  """
  if base_name(name) not in BUILDERS:
    raise ValueError(f"prepare: {name!r} is not a local dataset; local ones are "
                     f"{sorted(BUILDERS)}. Prepare TFDS datasets with "
                     "`tfds build NAME --data_dir=DIR`.")
  builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
  # A no-op when prepared, apart from the builder's own consistency checks.
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


__all__ = ["BUILDERS", "FashionMnistLocal", "ImageFolderLocal", "base_name",
           "prepare"]
