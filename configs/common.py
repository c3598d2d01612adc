"""Pieces shared by the auto-encoder configs: model, objective, diffusion, optimizer.

Each config file stays readable top to bottom; these helpers only fill the sections
whose meaning is the same for every dataset.
"""
import ml_collections as mlc

from big_vision import methods
from big_vision.models import ae

# Options every auto-encoder config accepts, with their defaults. Method-dependent ones
# (mask ratios, no_noise_prob, adaln; MaskDM's masking and noised_x0_loss, DiffMAE's
# decoder_queries) come from big_vision.methods.PRESETS.
COMMON_OPTIONS = dict(
    method="umd",
    variant="B/4",
    decoder_width=0,   # 0: the config's rule (UMD: same width as the encoder).
    decoder_depth=0,   # 0: the config's rule.
    decoder_mlp_dim=0,  # 0: the model's, 4 x decoder width.
    num_cls_tokens=4,
    posemb=ae.Model.posemb,  # sincos2d (fixed) or learn.
    masking=ae.Model.masking,  # random, or block: MaskDM's whole blocks of patches...
    mask_block_size=ae.Model.mask_block_size,  # ... this many patches a side.
    use_labels=False,
    scan=False,
    remat="none",
    dtype_mm="float32",
    dtype_activations="float32",  # bfloat16: the residual stream too (accelerators).
    attention="xla",   # auto: cuDNN's fused attention on a GPU with bf16 matmuls.
    flat_dense=True,   # Token Dense layers as one flat matmul (False: nn.Dense's 3-D dot).
    autodiff_backward=False,  # True: JAX's autodiff for GELU, LayerNorm, softmax (to compare).
    backward_kernels="xla",  # pallas: the LayerNorms' and gates' backward as Pallas kernels (GPU).
    decoder_queries=ae.Model.decoder_queries,  # mask_token, or noised_patches (DiffMAE).
    decoder_attention=ae.Model.decoder_attention,  # joint; DiffMAE's cross_self or cross.
    fsdp=False,
    batch_size=256,
    epochs=0.0,        # Either epochs or total_steps sets the run's length.
    total_steps=0,
    warmup=0.05,       # Share of training spent warming up.
    lr=1.5e-4,         # Base learning rate, scaled by batch_size / 256.
    wd=0.05,
    beta2=0.95,
    grad_clip=1.0,
    ema=0.0,           # EMA decay of parameters; 0 disables EMA.
    grad_accum=1,      # Micro-batches per step, so that a large batch fits in memory.
    noised_x0_loss=True,  # The noised branch's x0 loss on masked pixels (MaskDM: False).
    label_dropout=0.1, # Share of labels replaced by the null class (for CFG).
    schedule="cosine",
    timesteps=1000,
    sampling_timesteps=125,
    init_from="",
    seed=0,
    wandb_mode="offline",
)


def parse(arg, method_defaults=None, **config_defaults):
  """Typed options: COMMON_OPTIONS < config_defaults < method preset < explicit."""
  defaults = dict(COMMON_OPTIONS)
  defaults.update(config_defaults)
  return methods.parse_method_arg(arg, method_defaults, **defaults)


def model(arg, image_size, channels, num_classes, decoder_rule):
  """The model section. decoder_rule(encoder) -> (width, depth) when not given."""
  encoder = ae.decode_variant(arg.variant)
  rule_width, rule_depth = decoder_rule(encoder)
  return mlc.ConfigDict(dict(
      variant=arg.variant,
      image_size=image_size,
      channels=channels,
      adaln=arg.adaln,
      num_classes=num_classes,
      num_cls_tokens=arg.num_cls_tokens,
      decoder_width=arg.decoder_width or rule_width,
      decoder_depth=arg.decoder_depth or rule_depth,
      decoder_mlp_dim=arg.decoder_mlp_dim or None,
      posemb=arg.posemb,
      masking=arg.masking,
      mask_block_size=arg.mask_block_size,
      scan=arg.scan,
      remat_policy=arg.remat,
      dtype_mm=arg.dtype_mm,
      dtype_activations=arg.dtype_activations,
      attention=arg.attention,
      flat_dense=arg.flat_dense,
      autodiff_backward=arg.autodiff_backward,
      backward_kernels=arg.backward_kernels,
      decoder_queries=arg.decoder_queries,
      decoder_attention=arg.decoder_attention,
  ))


def objective(config, arg):
  """The UMD batch split that every method is a preset of (see big_vision.methods)."""
  config.method = arg.method
  config.mask_ratio = arg.mask_ratio
  config.mask_ratio_no_noise = arg.mask_ratio_no_noise
  config.no_noise_prob = arg.no_noise_prob
  config.noised_x0_loss = arg.noised_x0_loss
  # The clean and noised rows through the model in one call (False: a call per branch,
  # the straightforward way; the same loss and gradients, tests/test_objective.py).
  config.one_model_call = True


def diffusion(arg, latent=False):
  return mlc.ConfigDict(dict(
      schedule="linear" if latent else arg.schedule,
      timesteps=arg.timesteps,
      sampling_timesteps=arg.sampling_timesteps,
      clip_x0=not latent,  # Latents have no [-1, 1] range to clip to.
      eta=0.0,
  ))


def schedule_and_optimizer(config, arg):
  """Length, warmup, AdamW and EMA; lr = base lr x batch / 256."""
  if arg.total_steps:
    config.total_steps = arg.total_steps
  else:
    config.total_epochs = arg.epochs
  config.warmup_fraction = arg.warmup
  config.lr = arg.lr
  config.lr_batch_scaling = 256
  config.wd = arg.wd
  config.optax = dict(b1=0.9, b2=arg.beta2)
  config.grad_clip_norm = arg.grad_clip
  config.ema_decay = arg.ema
  config.grad_accum_steps = arg.grad_accum
  config.label_dropout = arg.label_dropout
  config.param_sharding = "fully_sharded" if arg.fsdp else "replicated"
  config.init_from = arg.init_from
  config.seed = arg.seed
  config.wandb = dict(mode=arg.wandb_mode, project="masked-diffusion-ae")
