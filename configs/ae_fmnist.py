# pylint: disable=line-too-long
r"""UMD on Fashion-MNIST (28x28 grayscale): the main job that runs on a laptop CPU.

  python -m big_vision.train --config configs/ae_fmnist.py --workdir DIR
  ... :method=mae   ... :method=dit   ... :method=maskdit   ... :method=maskdm
  ... :method=diffmae (inpainting rather than samples)
  ... :epochs=20   ... :variant=S/4

The data comes from Debian's dataset-fashion-mnist files, turned into a TFDS dataset
(`fashion_mnist_local`) on first use; no download. Defaults are sized to finish in about
15 minutes on 2 CPU cores and show the loss falling; `epochs=` or `total_steps=` run longer.
FID/IS use our own Fashion-MNIST classifier (`feature_net=PATH`, made once by
`python -m big_vision.tools.train_feature_net`); without it sampling draws only its grid
and inpainting runs without FID.
"""
import os

import ml_collections as mlc

from big_vision import methods
from configs import common


def get_config(arg=None):
  """Config for Fashion-MNIST auto-encoder training."""
  # MaskDM masks blocks of 4x4 patches; Ti/4's 7x7 grid has none: single patches here.
  arg = common.parse(
      arg, method_defaults={"maskdm": dict(masking="random")},
      variant="Ti/4", batch_size=128, epochs=1.5, lr=1.5e-4 * 4, warmup=0.05,
      timesteps=1000, sampling_timesteps=50, data_dir="", shuffle_buffer=20_000,
      evals=True, eval_epochs=1.0, fid_samples=500,
      feature_net="~/.cache/big_vision/fmnist_classifier.npz")

  config = mlc.ConfigDict()
  config.input = mlc.ConfigDict()
  config.input.data = dict(name="fashion_mnist_local", split="train",
                           data_dir=arg.data_dir or None)
  config.input.batch_size = arg.batch_size
  config.input.shuffle_buffer_size = arg.shuffle_buffer
  config.input.cache_raw = True  # 47 MB of uint8 pixels.
  config.input.pp = "flip_lr|value_range(-1, 1)|keep('image', 'label')"
  config.pp_eval = "value_range(-1, 1)|keep('image', 'label')"
  config.input.prefetch = 4
  config.log_training_steps = 50
  config.ckpt_steps = 500
  config.image_steps = 500

  common.objective(config, arg)
  # The size table's light decoder (Ti: 96 wide, 4 deep) keeps the CPU run short.
  config.model = common.model(
      arg, image_size=28, channels=1, num_classes=10 if arg.use_labels else 0,
      decoder_rule=lambda enc: (enc["decoder_width"], enc["decoder_depth"]))
  config.diffusion = common.diffusion(arg)
  common.schedule_and_optimizer(config, arg)
  config.evals = evals(config, arg) if arg.evals else mlc.ConfigDict()
  return config


def evals(config, arg):
  """Probe, validation loss and reconstructions every `eval_epochs` and at the end;
  samples (FID/IS with our Fashion-MNIST classifier) and inpainting at the end."""
  every = dict(every_epochs=arg.eval_epochs) if arg.eval_epochs else {}
  feature_net = dict(kind="fmnist_classifier", weights=os.path.expanduser(arg.feature_net))
  result = mlc.ConfigDict()
  # Features of clean images, or of noised ones for models that never see clean inputs.
  features = methods.probe_features(config)
  # Shots, and the held-out part for the ridge strength, come from the first 5000 training
  # images; accuracy is measured on the whole test split.
  probe = dict(type="fewshot", train_split="train[:5000]", test_split="test")
  result.fewshot = dict(probe, features=features, **every)
  result.fewshot_pixels = dict(probe, features="pixels")  # The baseline to beat.
  result.val = dict(type="diffusion_loss", **every)
  if methods.learnt_mask_ratio(config) > 0:
    result.reconstruction = dict(type="reconstruction", **every)
  if methods.samples_from_noise(config):
    result.samples = dict(type="sampling", num_samples=arg.fid_samples, batch_size=100,
                          feature_net=feature_net)
    if arg.use_labels:  # Classifier-free guidance needs labels.
      result.samples.guidance_scales = (1.0, 3.0)
  if config.no_noise_prob < 1:  # Only models trained on noised images can inpaint.
    # One batch, sharded over the devices: 200 divides on 1, 2, 4 or 8 of them.
    result.inpainting = dict(type="inpainting", mask_ratio=0.5, max_examples=200,
                             batch_size=200, feature_net=feature_net)
  return result
