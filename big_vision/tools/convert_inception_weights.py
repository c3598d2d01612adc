r"""One-time conversion of pytorch-fid's Inception weights to this codebase's .npz format.

  python -m big_vision.tools.convert_inception_weights \
      --src pt_inception-2015-12-05-6726825d.pth --out ~/.cache/big_vision/inception_fid.npz

Needs PyTorch for reading the .pth (only here; nothing else imports torch). The result is
checked name by name and shape by shape against big_vision/models/inception.py.
"""
import os

from absl import app
from absl import flags
import numpy as np

from big_vision.models import inception

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def torch_name_to_flax(name, array):
  """'Mixed_5b.branch1x1.conv.weight' (OIHW) -> ('Mixed_5b/branch1x1/conv/kernel', HWIO).

  Returns (None, None) for entries FID does not use (num_batches_tracked, AuxLogits).
  """
  parts = name.split(".")
  array = np.asarray(array, np.float32)
  if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
    return None, None
  if parts[0] == "fc":
    return ("fc/kernel", array.T) if parts[-1] == "weight" else ("fc/bias", array)
  if parts[-2] == "conv" and parts[-1] == "weight":
    return "/".join(parts[:-1] + ["kernel"]), array.transpose(2, 3, 1, 0)
  if parts[-2] == "bn" and parts[-1] in _BN:
    # Batch-norm parameters live directly in the ConvBN module, beside its conv.
    return "/".join(parts[:-2] + [_BN[parts[-1]]]), array
  raise ValueError(f"unexpected entry {name!r} in the Inception state dict")


def convert(state_dict, out):
  flat = {}
  for name, value in state_dict.items():
    key, array = torch_name_to_flax(name, np.asarray(value))
    if key is not None:
      flat[key] = array
  # Written whole or not at all (an interrupted conversion leaves no half file).
  inception.save_flat_weights(flat, out)
  inception.load_fid_weights(out)  # Every name and shape must match the network.
  return out


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(flags.FLAGS.src, map_location="cpu", weights_only=True)
  print(f"wrote {convert({k: v.numpy() for k, v in state.items()}, flags.FLAGS.out)}")


if __name__ == "__main__":
  flags.DEFINE_string("src", None, "pt_inception-2015-12-05-6726825d.pth", required=True)
  flags.DEFINE_string("out", os.path.expanduser("~/.cache/big_vision/inception_fid.npz"),
                      "Where to write the .npz.")
  app.run(main)
