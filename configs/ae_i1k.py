# pylint: disable=line-too-long
r"""UMD (and MAE, DiT, MaskDiT, MaskDM, DiffMAE) on ImageNet-2012 at 64x64 pixels, the UMD
paper's recipe.

Self-supervised pre-training, 800 epochs, B/4 (100-shot linear probe every 10k steps):
  python -m big_vision.train --config configs/ae_i1k.py:method=umd,variant=B/4,size=64 --workdir DIR
  ... :method=mae,batch_size=4096      ... :method=dit      ... :method=maskdit
  ... :method=maskdm   (blocks of 4x4 patches, 75% masked, eps loss on visible patches)
  ... :method=diffmae  (DiffMAE's light decoder, e.g. B: 384 wide, 8 deep; inpainting
                        FID/IS instead of samples)
  ... :variant=B/4,no_noise_prob=0.0,mask_ratio=0.5        (explicit options override the preset)
Class-conditional fine-tuning of a pre-trained checkpoint (50 epochs, EMA, CFG):
  ... :variant=B/4,finetune=True,init_from=PRETRAIN_WORKDIR
  (sets use_labels, mask_ratio=0, no_noise_prob=0.05 (0 for dit, maskdit and maskdm), batch 256,
  beta2 0.999, wd 0, area_min 95)
Latent UMD-L/2 at 256x256 on Stable-Diffusion VAE latents (32x32x4) is not available yet:
  the options exist (latent_diffusion=True,size=256,vae_weights=...) but the trainer stops
  with a one-line error, since it has no VAE encoder so far.

Needs imagenet2012 prepared with TFDS in $TFDS_DATA_DIR (it cannot be downloaded here).
"""
import os

import ml_collections as mlc

from big_vision import config_parsing
from big_vision import methods
from configs import common

# The fine-tuning recipe of the UMD paper; explicit options still override it. Seed 002's
# fine-tuning commands keep a 5% clean (no-noise) share for UMD, MAE and latent UMD, and
# none for the DiT and MaskDiT baselines (and MaskDM, fine-tuned as a plain DDPM).
FINETUNE = dict(use_labels=True, mask_ratio=0.0, no_noise_prob=0.05, batch_size=256,
                beta2=0.999, wd=0.0, area_min=95, epochs=50.0, ema=0.9999)
FINETUNE_NO_NOISE_PROB = {"dit": 0.0, "maskdit": 0.0, "maskdm": 0.0}


def get_config(arg=None):
  """Config for UMD-style training on ImageNet-2012."""
  finetune = config_parsing.peek(arg, "finetune", False)
  # ImageNet runs on accelerators: bfloat16 matmuls (float32 parameters, norms and loss),
  # and cuDNN's fused attention where the GPU has it ('auto'; XLA's elsewhere): on an H100
  # B/4 at 64x64, batch 256, trains at 2427 img/s with it against 1993 without, and peaks
  # at 25.5 GiB against 33.4 (docs/BENCHMARKS.md). Scan and remat stay off: that fits an
  # 80 GB GPU without them, and on a CPU each costs 20-31% of a step.
  # dtype_activations=bfloat16 (the residual stream too) gave another 10% on the H100.
  defaults = dict(size=64, epochs=800.0, batch_size=1024, area_min=80, finetune=False,
                  dtype_mm="bfloat16", attention="auto",
                  latent_diffusion=False, vae_weights="", fewshot_steps=10_000,
                  inception_weights="~/.cache/big_vision/inception_fid.npz")
  # MAE's pre-training batch is 4096; fine-tuning uses one recipe for every method but
  # for the clean share.
  method_defaults = {"mae": dict(batch_size=4096)}
  if finetune:
    method_defaults = {m: dict(FINETUNE, no_noise_prob=FINETUNE_NO_NOISE_PROB.get(
        m, FINETUNE["no_noise_prob"])) for m in methods.PRESETS}
  arg = common.parse(arg, method_defaults=method_defaults, **defaults)
  if arg.finetune and not arg.init_from:  # The trainer reads init_from, not finetune.
    raise config_parsing.ConfigError(
        "finetune=True needs init_from=PRETRAIN_WORKDIR (the pre-trained run to start "
        "from); without it the recipe trains from scratch")

  config = mlc.ConfigDict()
  config.size = arg.size
  config.latent_diffusion = arg.latent_diffusion
  if arg.latent_diffusion:
    if arg.size != 256:
      raise config_parsing.ConfigError(f"latent_diffusion needs size=256 (the VAE maps 256 -> 32), got {arg.size}")
    space = (32, 32, 4)
    config.vae = dict(weights=arg.vae_weights, latent_scale=0.18215)
  else:
    space = (arg.size, arg.size, 3)
  config.diffusion_space = space

  config.input = mlc.ConfigDict()
  # JPEGs stay encoded until pp: the shuffle buffer then holds 250k encoded images (~110 kB
  # each) rather than decoded ones, and resuming skips examples without decoding them.
  # The evaluators read their own data section, decoded by TFDS; `decode` passes those.
  config.input.data = dict(name="imagenet2012", split="train[:99%]", skip_decode=("image",))
  config.input.batch_size = arg.batch_size
  config.input.shuffle_buffer_size = 250_000
  config.input.cache_raw = False  # True needs ~120 GB of host memory.
  config.input.pp = (f"decode_jpeg_and_inception_crop({arg.size}, area_min={arg.area_min})"
                     "|flip_lr|value_range(-1, 1)|keep('image', 'label')")
  config.pp_eval = (f"decode|resize_small({arg.size})|central_crop({arg.size})"
                    "|value_range(-1, 1)|keep('image', 'label')")
  config.input.prefetch = 8
  config.log_training_steps = 100
  config.ckpt_steps = 5000

  common.objective(config, arg)
  # UMD's decoder keeps the encoder's width with 4 layers (8 for L and H); DiffMAE's is
  # its paper's (the size table's).
  umd_decoder = lambda enc: (enc["width"], 4 if enc["depth"] <= 12 else 8)
  table_decoder = lambda enc: (enc["decoder_width"], enc["decoder_depth"])
  config.model = common.model(
      arg, image_size=space[0], channels=space[2], num_classes=1000 if arg.use_labels else 0,
      decoder_rule=table_decoder if arg.method == "diffmae" else umd_decoder)
  config.diffusion = common.diffusion(arg, latent=arg.latent_diffusion)
  common.schedule_and_optimizer(config, arg)
  config.finetune = arg.finetune
  config.eval_split = "validation"
  config.evals = evals(config, arg)
  return config


def evals(config, arg):
  """The UMD paper's auto-evaluation: 100-shot probe every 10k steps (shots from the
  first 300k training images), validation loss and reconstructions, and for
  label-conditioned runs FID/IS of 10k samples (125 DDIM steps, guidance 1, 2 and 4);
  for DiffMAE, FID of 10k validation images with their masked patches inpainted."""
  result = mlc.ConfigDict()
  # The probe draws 20 held-out images (ridge strength) + 100 shots from every class.
  # Classes hold 732-1300 training images: the first 300k give the smallest ~170, while
  # 100k (~57 for it, ~100 on average) would stop the run at its first probe.
  result.fewshot = dict(
      type="fewshot", every_steps=arg.fewshot_steps, train_split="train[:300000]",
      test_split="validation", shots=(10, 25, 100),
      features=methods.probe_features(config))
  if config.no_noise_prob < 1:
    result.val = dict(type="diffusion_loss", every_steps=25_000, max_examples=10_000)
  if methods.learnt_mask_ratio(config) > 0:
    result.reconstruction = dict(type="reconstruction", every_steps=25_000)
  if methods.is_diffmae(config):  # Its generative use: completing masked images.
    result.inpainting = dict(
        type="inpainting", every_steps=25_000, mask_ratio=config.mask_ratio,
        max_examples=10_000, batch_size=250, reference_split="validation",
        max_reference=50_000,
        feature_net=dict(kind="inception", weights=os.path.expanduser(arg.inception_weights)))
  if methods.samples_from_noise(config) and arg.use_labels:
    result.samples = dict(
        type="sampling", every_steps=25_000, num_samples=10_000, batch_size=250,
        guidance_scales=(1.0, 2.0, 4.0), reference_split="validation", floor_split="train",
        max_reference=50_000,
        feature_net=dict(kind="inception", weights=os.path.expanduser(arg.inception_weights)))
  return result
