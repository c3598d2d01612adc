r"""Checks that big_vision's Flax FID Inception computes what pytorch-fid's network computes.

Two halves, because torch must not enter the project's venv:

  # 1. In a separate venv with torch, torchvision, pytorch-fid, numpy, scipy:
  #    builds pytorch-fid's InceptionV3 (random weights, or the real ones with --pth), runs it
  #    on test images of several sizes and writes weights, images and outputs to --npz.
  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch torchvision pytorch-fid scipy
  /tmp/torchenv/bin/python scripts/check_inception_against_pytorch_fid.py --stage torch \
      --npz /tmp/inception_check.npz [--pth pt_inception-2015-12-05-6726825d.pth]
  # 2. In the project venv: converts those weights with convert_inception_weights.convert,
  #    runs the Flax network on the same images and prints the comparison table.
  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python scripts/check_inception_against_pytorch_fid.py \
      --stage flax --npz /tmp/inception_check.npz

Exits non-zero when a relative difference exceeds --tol (float32 round-off is ~1e-6).
"""
import argparse
import sys

import numpy as np

# (tag, size, channels, count): no resize, upsampling, grey, downsampling (no antialias).
CASES = [("299x299x3", 299, 3, 8), ("64x64x3", 64, 3, 8), ("32x32x3", 32, 3, 8),
         ("28x28x1", 28, 1, 8), ("512x512x3", 512, 3, 8), ("fid64x64x3", 64, 3, 64)]


def smooth_images(rng, n, size, channels):
  """[n, size, size, channels] in [0, 1]: blurred noise, so resizes see image-like content."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  x = rng.normal(size=(n, size, size, channels))
  x = ndimage.gaussian_filter(x, sigma=(0, size / 32, size / 32, 0))
  x = (x - x.mean()) / (4 * x.std()) + 0.5
  return np.clip(x, 0, 1).astype(np.float32)


def torch_stage(args):
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as fid_inception  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)  # Inference only (fc is outside InceptionV3's no-grad params).
  torch.manual_seed(0)
  rng, weight_rng = np.random.default_rng(0), np.random.default_rng(1)  # Same images with --pth.
  built = {}

  def load_state_dict_from_url(url, **unused_kwargs):
    # fid_inception_v3() calls this right after building its (random-init) `inception`;
    # we take that network from the caller's frame, for its state dict and for its fc layer,
    # which pytorch-fid's InceptionV3 drops but Inception Score users apply to pool3.
    net = built["net"] = sys._getframe(1).f_locals["inception"]  # pylint: disable=protected-access
    if args.pth:
      return torch.load(args.pth, map_location="cpu", weights_only=True)
    # Random convs under unit batch-norm statistics would shrink activations ~6x per layer
    # to nothing by pool3, so first set the statistics to those of a calibration batch
    # (train mode, momentum None: the plain batch mean and variance) ...
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
      bn.reset_running_stats()
      bn.momentum = None
    calib = torch.from_numpy(smooth_images(weight_rng, 8, 299, 3)).permute(0, 3, 1, 2) * 2 - 1
    net.train()(calib)
    net.eval()
    # ... then perturb all four per channel, so that a wrong mapping or eps would show.
    state = net.state_dict()
    for name, v in state.items():
      g = torch.from_numpy(weight_rng.uniform(size=v.shape).astype(np.float32))  # U[0, 1)
      if name.endswith("bn.weight"):
        state[name] = 0.5 + g                                    # scale in [0.5, 1.5)
      elif name.endswith("bn.bias"):
        state[name] = 0.4 * (g - 0.5)                            # shift in [-0.2, 0.2)
      elif name.endswith("running_mean"):
        var = state[name.replace("running_mean", "running_var")]
        state[name] = v + 0.4 * (g - 0.5) * var.sqrt()           # +-0.2 std off the truth
      elif name.endswith("running_var"):
        state[name] = v * (0.5 + 1.5 * g) + 1e-4                 # 0.5x to 2x, positive
      elif name == "fc.bias":
        state[name] = g - 0.5
    return state

  fid_inception.load_state_dict_from_url = load_state_dict_from_url
  model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                    resize_input=True, normalize_input=True,
                                    use_fid_inception=True).eval()
  fc = built["net"].fc
  out = {f"sd/{k}": v.numpy() for k, v in built["net"].state_dict().items()}
  for tag, size, channels, n in CASES:
    images = smooth_images(rng, n, size, channels)  # NHWC in [0, 1]
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # pytorch-fid takes NCHW in [0, 1]
    x = x.expand(-1, 3, -1, -1) if channels == 1 else x  # and 3 channels only.
    feats = torch.cat([model(b)[0].flatten(1) for b in x.split(8)])
    logits = fc(feats)
    out.update({f"img/{tag}": images, f"feat/{tag}": feats.numpy(),
                f"logit/{tag}": logits.numpy(),
                # Inception Score's probabilities: softmax of pool3 @ fc.weight.T, no bias.
                f"prob/{tag}": torch.softmax(feats @ fc.weight.T, -1).numpy()})
    # A sanity check on the random weights: pool3 neither vanishes nor explodes, and
    # varies from image to image (mean std over images, per feature).
    print(f"{tag}: pool3 mean {feats.mean():.3f}, std {feats.std():.3f}, std over images "
          f"{feats.std(0).mean():.3f}, zeros {(feats == 0).float().mean():.3f}; "
          f"logits std {logits.std():.3f}")
  np.savez(args.npz, **out)
  print(f"wrote {args.npz} (torch {torch.__version__})")


def flax_stage(args):
  import os  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from big_vision.evaluators import fid_math  # pylint: disable=g-import-not-at-top
  from big_vision.models import inception  # pylint: disable=g-import-not-at-top
  from big_vision.tools import convert_inception_weights  # pylint: disable=g-import-not-at-top
  data = np.load(args.npz)
  state = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
  weights = os.path.join(tempfile.mkdtemp(), "inception_fid.npz")
  convert_inception_weights.convert(state, weights)
  params = inception.load_fid_weights(weights)
  apply = jax.jit(lambda x: inception.FIDInceptionV3().apply({"params": params}, x))
  feature_fn = inception.feature_fn(weights)  # What the evaluators call.

  def rel(a, b):  # Max abs difference relative to the largest magnitude of the reference.
    return np.abs(a - b).max() / np.abs(b).max()

  worst = 0.0
  print(f"{'case':>11} | {'feat maxabs':>11} {'feat rel':>9} | {'logit maxabs':>12} "
        f"{'logit rel':>9} | {'prob maxabs':>11}")
  for tag, _, _, _ in CASES:
    images = data[f"img/{tag}"] * 2 - 1  # The Flax network takes NHWC in [-1, 1], 1 or 3 ch.
    outs = [(*apply(b), feature_fn(b)[1]) for b in np.split(images, len(images) // 8)]
    feats, logits, probs = (np.concatenate([np.asarray(o[i]) for o in outs]) for i in range(3))
    tf, tl, tp = data[f"feat/{tag}"], data[f"logit/{tag}"], data[f"prob/{tag}"]
    worst = max(worst, rel(feats, tf), rel(logits, tl))
    print(f"{tag:>11} | {np.abs(feats - tf).max():11.3e} {rel(feats, tf):9.2e} | "
          f"{np.abs(logits - tl).max():12.3e} {rel(logits, tl):9.2e} | "
          f"{np.abs(probs - tp).max():11.3e}")
  # FID between the two implementations' features of the same 64 images: ~0 (4e-7 from
  # their float32 differences), beside the formula's own float64 floor, FID(torch, torch),
  # and the FID between the two halves of those images for the scale.
  stats = fid_math.feature_statistics
  tf = data["feat/fid64x64x3"]
  fid, floor, ref = (fid_math.frechet_distance(*stats(a), *stats(b))
                     for a, b in ((feats, tf), (tf, tf), (tf[:32], tf[32:])))
  print(f"FID on 64 images of 64x64: flax vs torch {fid:.3e}; torch vs itself {floor:.3e}; "
        f"torch first vs second half {ref:.1f}")
  print(f"worst relative difference {worst:.2e} (tolerance {args.tol:g})")
  return 0 if worst <= args.tol else 1


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", choices=("torch", "flax"), required=True)
  parser.add_argument("--npz", default="/tmp/inception_check.npz")
  parser.add_argument("--pth", help="pt_inception-2015-12-05-6726825d.pth; default: random")
  parser.add_argument("--tol", type=float, default=1e-4)
  parsed = parser.parse_args()
  sys.exit(torch_stage(parsed) if parsed.stage == "torch" else flax_stage(parsed))
