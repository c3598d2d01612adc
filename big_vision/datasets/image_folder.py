"""TFDS builder `image_folder_local`: a directory of PNG/JPEG files.

Source layout (`source_dir=` keyword or IMAGE_FOLDER_DIR environment variable):

    root/*.png                      -> split "train", no labels
    root/<class>/**.png             -> split "train", labelled
    root/train/... [root/test/...]  -> splits "train" [and "test"], each laid
                                       out as one of the two cases above

Labels are a ClassLabel over the sorted names of the class sub-folders (union
over splits). Without class sub-folders the dataset has no "label" feature at
all, rather than a sentinel such as -1 that a loss could silently consume.
Files ending in .png/.jpg/.jpeg (any case) count as images; hidden and other
files are ignored. Images are stored as their original encoded bytes (checked
to be readable), so pick a size in the pp string: `decode|resize(64)|...`.
Every example also has "file_name", its path relative to the split folder.

One prepared copy lives per TFDS data_dir, and it records the folder it was
prepared from; to prepare two different folders, use two data_dirs. Naming
another source folder for a data_dir already prepared (even only to read it)
is an error rather than a silent reuse of the old images; naming none reads the
prepared copy. The copy is not refreshed when files are added to or removed
from its folder: delete it to prepare again.
"""
import os

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from big_vision.config_parsing import ConfigError

SOURCE_DIR_ENV = "IMAGE_FOLDER_DIR"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _split_dirs(root: str) -> dict[str, str]:
  """Maps split name -> folder, following the layout in the module docstring."""
  if os.path.isdir(os.path.join(root, "train")):
    dirs = {"train": os.path.join(root, "train")}
    if os.path.isdir(os.path.join(root, "test")):
      dirs["test"] = os.path.join(root, "test")
    return dirs
  if os.path.isdir(os.path.join(root, "test")):
    raise ValueError(f"{root!r} has a test/ folder but no train/ folder; put "
                     "the training images under train/ (or rename test/ if it "
                     "is a class).")
  return {"train": root}


def _scan_split(folder: str) -> tuple[list[str], list[str] | None]:
  """Returns (image paths relative to folder, class names or None)."""
  entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
  classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
  top_images = [e for e in entries
                if _is_image(e) and os.path.isfile(os.path.join(folder, e))]
  if not classes:
    return top_images, None
  if top_images:
    raise ValueError(f"{folder!r} mixes class sub-folders {classes} with "
                     f"images outside them (e.g. {top_images[0]!r}); move "
                     "those into a class folder.")
  paths = []
  for cls in classes:
    for dirpath, dirnames, filenames in os.walk(os.path.join(folder, cls)):
      dirnames.sort()  # Deterministic walk order.
      rel = os.path.relpath(dirpath, folder)
      paths += [os.path.join(rel, f) for f in sorted(filenames) if _is_image(f)]
  return paths, classes


def scan(source_dir: str) -> tuple[dict[str, list[str]], list[str] | None]:
  """Returns ({split: relative image paths}, sorted class names or None)."""
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(f"Image folder {source_dir!r} does not exist.")
  split_files, split_classes = {}, {}
  for split, folder in _split_dirs(source_dir).items():
    files, classes = _scan_split(folder)
    if not files:
      raise ValueError(f"No {'/'.join(IMAGE_EXTENSIONS)} images found in "
                       f"{folder!r} (split {split!r}).")
    split_files[split], split_classes[split] = files, classes
  labelled = {split: c is not None for split, c in split_classes.items()}
  if len(set(labelled.values())) > 1:
    raise ValueError(f"{source_dir!r}: splits disagree on having class "
                     f"sub-folders: {labelled}.")
  if not any(labelled.values()):
    return split_files, None
  return split_files, sorted(set().union(*split_classes.values()))


def _resolve_source_dir(source_dir: str | None) -> str | None:
  source_dir = source_dir or os.environ.get(SOURCE_DIR_ENV)
  return os.path.abspath(source_dir) if source_dir else None


class ImageFolderLocal(tfds.core.GeneratorBasedBuilder):
  """A folder of PNG/JPEG images, optionally with class sub-folders."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # See fashion_mnist.py: works around tensorflow/datasets#11212.
  code_path = epath.Path(__file__)

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self._source_dir = _resolve_source_dir(source_dir)
    super().__init__(**kwargs)
    self._check_source()

  def _check_source(self):
    """A prepared copy from another folder would otherwise be read silently."""
    if self.is_prepared() and self._source_dir:
      prepared_from = self.info.metadata.get("source_dir")
      if prepared_from != self._source_dir:
        raise ConfigError(
            f"{os.fspath(self.data_path)!r} holds image_folder_local prepared from "
            f"{prepared_from!r}, not {self._source_dir!r} (source_dir / "
            f"{SOURCE_DIR_ENV}); use another data_dir (one prepared folder per "
            "data_dir), delete it to prepare it again, or name no source folder to "
            "read the prepared copy")

  def download_and_prepare(self, *args, **kwargs):
    self._check_source()  # Again: another process may have prepared it since __init__.
    return super().download_and_prepare(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    if (self.data_path / "features.json").exists():
      # A prepared copy stores its features; no need to scan the source.
      features = tfds.features.FeatureConnector.from_config(
          os.fspath(self.data_path))
    elif self._source_dir:
      _, class_names = scan(self._source_dir)
      features = {"image": tfds.features.Image(shape=(None, None, 3)),
                  "file_name": tfds.features.Text()}
      if class_names is not None:
        features["label"] = tfds.features.ClassLabel(names=class_names)
      features = tfds.features.FeaturesDict(features)
    else:
      raise ConfigError(
          f"image_folder_local is not prepared in {os.fspath(self.data_path)!r} and no "
          f"source folder is given: set data.source_dir (the builder's source_dir=) "
          f"or {SOURCE_DIR_ENV} to a folder of images")
    return tfds.core.DatasetInfo(
        builder=self,
        description="Images from a local folder (see big_vision/datasets/"
                    "image_folder.py for the layout).",
        features=features,
        supervised_keys=(("image", "label") if "label" in features.keys()
                         else None),
        metadata=tfds.core.MetadataDict(source_dir=self._source_dir),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    if not self._source_dir:
      raise ConfigError("image_folder_local needs a source folder to be prepared: set "
                        f"data.source_dir (the builder's source_dir=) or {SOURCE_DIR_ENV}")
    split_files, class_names = scan(self._source_dir)
    split_dirs = _split_dirs(self._source_dir)
    return {split: self._generate_examples(split_dirs[split], files,
                                           class_names is not None)
            for split, files in split_files.items()}

  def _generate_examples(self, folder, files, labelled):
    for rel_path in files:
      path = os.path.join(folder, rel_path)
      try:
        with Image.open(path) as img:
          img.verify()  # Fail here, naming the file, not later in training.
      except Exception as e:  # PIL raises many types for corrupt files.
        raise ValueError(f"Cannot read image {path!r}: {e}") from e
      example = {"image": path, "file_name": rel_path}
      if labelled:
        example["label"] = rel_path.split(os.sep)[0]
      yield rel_path, example
