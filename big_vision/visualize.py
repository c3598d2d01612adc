"""Pictures of a run: PNG grids of images and the loss curve, to a local path or a URL."""
import io
import json
import os

import matplotlib
matplotlib.use("Agg")  # No screen on training machines.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from PIL import Image
from PIL import ImageDraw

from big_vision import fileio


def to_uint8(images):
  """[-1, 1] floats -> uint8, grayscale kept as one channel."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(rows, path, row_names=None, scale=None, pad=2):
  """Writes rows of images ([N, H, W, C] in [-1, 1] each) as one PNG.

  Small images are upscaled (nearest) so that a 28x28 digit is still readable.
  Returns the path.
  """
  rows = [to_uint8(r) for r in rows]
  n = max(len(r) for r in rows)
  h, w, c = rows[0].shape[1:]
  scale = scale or max(1, 96 // max(h, w))
  canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      canvas[y:y + h, x:x + w] = img
  if c == 1:
    canvas = canvas[..., 0]
  image = Image.fromarray(canvas).convert("RGB")
  image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  if row_names:  # A left margin saying what each row is.
    margin = 8 + 6 * max(len(name) for name in row_names)
    labelled = Image.new("RGB", (image.width + margin, image.height), "white")
    labelled.paste(image, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for i, name in enumerate(row_names):
      y = (pad + i * (h + pad) + h // 2) * scale - 5
      draw.text((4, y), name, fill="black")
    image = labelled
  _write_png(path, image.save)
  return path


def _write_png(path, save):
  """save(file, format="png") into memory, then to path (gs:// has no local file to open)."""
  buffer = io.BytesIO()
  save(buffer, format="png")
  fileio.makedirs(os.path.dirname(fileio.absolute(path)))
  fileio.write_bytes(path, buffer.getvalue())


def read_metrics(jsonl_path):
  return [json.loads(line) for line in fileio.read_text(jsonl_path).splitlines()
          if line.strip()]


def loss_curve(jsonl_path, png_path, keys=("loss", "loss_clean", "loss_noised")):
  """Plots the training losses logged in metrics.jsonl against the step."""
  records = read_metrics(jsonl_path)
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for key in keys:
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, label=key)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _write_png(png_path, fig.savefig)
  plt.close(fig)
  return png_path
