"""Config strings, method presets and the ImageNet config for every method and variant."""
import pytest

from big_vision import config_cli
from big_vision import config_parsing
from big_vision import methods
from big_vision.config_parsing import ConfigError
from configs import ae_fmnist
from configs import ae_i1k


def test_parse_arg_types():
  arg = config_parsing.parse_arg(
      "variant=B/4,size=64,lr=3e-4,scan,adaln=False,betas=(0.9,0.99),name='x,y'",
      variant="S/4", size=32, lr=1e-4, scan=False, adaln=True, betas=(0.9, 0.95), name="")
  assert arg.variant == "B/4" and arg.size == 64 and isinstance(arg.size, int)
  assert arg.lr == pytest.approx(3e-4) and isinstance(arg.lr, float)
  assert arg.scan is True and arg.adaln is False
  assert arg.betas == (0.9, 0.99)
  assert arg.name == "x,y"


def test_parse_arg_defaults_and_int_for_float():
  arg = config_parsing.parse_arg("lr=1", lr=0.5, steps=3)
  assert arg.lr == 1.0 and isinstance(arg.lr, float) and arg.steps == 3
  assert config_parsing.parse_arg(None, a=1).a == 1


def test_unknown_key_lists_known_keys():
  with pytest.raises(ConfigError, match=r"unknown config option 'sise'.*known options: lr, size"):
    config_parsing.parse_arg("sise=3", size=1, lr=0.1)


@pytest.mark.parametrize("arg,match", [
    ("size=abc", r"'size' expects an int.*got 'abc'"),
    ("lr=fast", r"'lr' expects a float"),
    ("scan=maybe", r"'scan' expects a bool"),
    ("size", r"'size' needs a value"),
])
def test_wrong_type_names_the_key(arg, match):
  with pytest.raises(ConfigError, match=match):
    config_parsing.parse_arg(arg, size=1, lr=0.1, scan=False)


@pytest.mark.parametrize("method", sorted(methods.PRESETS))
def test_method_presets_and_explicit_override(method):
  preset = methods.PRESETS[method]
  config = ae_i1k.get_config(f"method={method}")
  assert config.mask_ratio == preset["mask_ratio"]
  assert config.no_noise_prob == preset["no_noise_prob"]
  assert config.model.adaln == preset["adaln"]
  override = ae_i1k.get_config(f"method={method},mask_ratio=0.25,adaln={not preset['adaln']}")
  assert override.mask_ratio == 0.25 and override.model.adaln != preset["adaln"]
  methods.check_config(config)


def test_method_semantics():
  mae = ae_i1k.get_config("method=mae")
  assert mae.no_noise_prob == 1.0 and not mae.model.adaln and mae.input.batch_size == 4096
  dit = ae_i1k.get_config("method=dit")
  assert dit.no_noise_prob == 0.0 and dit.mask_ratio == 0.0
  maskdit = ae_i1k.get_config("method=maskdit")
  assert maskdit.no_noise_prob == 0.0 and maskdit.mask_ratio == 0.5
  assert maskdit.noised_x0_loss and maskdit.model.masking == "random"
  # MaskDM: masked denoising alone, whole blocks of 4x4 patches of the 16x16 grid masked.
  maskdm = ae_i1k.get_config("method=maskdm")
  assert maskdm.no_noise_prob == 0.0 and maskdm.mask_ratio == 0.75
  assert not maskdm.noised_x0_loss and "reconstruction" not in maskdm.evals
  assert (maskdm.model.masking, maskdm.model.mask_block_size) == ("block", 4)
  # Ti/4's 7x7 grid at 28x28 has no 4x4 blocks: Fashion-MNIST masks single patches.
  fmnist_maskdm = ae_fmnist.get_config("method=maskdm")
  assert fmnist_maskdm.model.masking == "random" and not fmnist_maskdm.noised_x0_loss
  with pytest.raises(ConfigError, match="mask_block_size=4 does not divide the patch grid 7x7"):
    methods.check_config(ae_fmnist.get_config("method=maskdm,masking=block"))
  # DiffMAE: noised masked patches as the decoder's queries, its paper's light decoder, the
  # probe on clean images, and inpainting rather than samples from noise.
  diffmae = ae_i1k.get_config("method=diffmae,use_labels=True")
  assert diffmae.model.decoder_queries == "noised_patches" and not diffmae.model.adaln
  assert (diffmae.no_noise_prob, diffmae.mask_ratio) == (0.0, 0.75)
  assert (diffmae.model.decoder_width, diffmae.model.decoder_depth) == (384, 8)
  assert diffmae.evals.fewshot.features == "representation" and "samples" not in diffmae.evals
  assert diffmae.evals.inpainting.mask_ratio == 0.75
  assert diffmae.evals.inpainting.feature_net.kind == "inception"
  fmnist_diffmae = ae_fmnist.get_config("method=diffmae")
  assert "samples" not in fmnist_diffmae.evals and "inpainting" in fmnist_diffmae.evals
  assert "reconstruction" in fmnist_diffmae.evals
  cross = ae_fmnist.get_config("method=diffmae,decoder_attention=cross")
  assert cross.model.decoder_attention == "cross"
  methods.check_config(cross)
  for bad in ("no_noise_prob=0.5", "mask_ratio=0.0", "noised_x0_loss=False"):
    with pytest.raises(ConfigError, match=r"decoder_queries='noised_patches' \(DiffMAE\) "
                                          r"denoises masked patches .* needs no_noise_prob=0"):
      methods.check_config(ae_fmnist.get_config(f"method=diffmae,{bad}"))
  umd = ae_i1k.get_config("")
  assert (umd.method, umd.mask_ratio, umd.mask_ratio_no_noise) == ("umd", 0.375, 0.75)
  assert umd.model.variant == "B/4" and umd.model.image_size == 64
  assert umd.diffusion.schedule == "cosine" and umd.diffusion.sampling_timesteps == 125
  assert umd.optax.b2 == 0.95 and umd.wd == 0.05 and umd.grad_clip_norm == 1.0
  # UMD's decoder keeps the encoder width.
  assert umd.model.decoder_width == 768 and umd.model.decoder_depth == 4


def test_unknown_method():
  with pytest.raises(ConfigError,
                     match=r"unknown method 'vae'.*diffmae, dit, mae, maskdit, maskdm, umd"):
    ae_i1k.get_config("method=vae")


# Fine-tuning starts from a pre-trained run (the path is not opened by the config).
FINETUNE = "finetune=True,init_from=/tmp/pretrain"


# The commands of seed 002 (UMD README), as config strings, and method presets.
I1K_VARIANTS = [
    "variant=B/4,size=64",
    "variant=B/4,size=64,batch_size=4096,adaln=False",
    "variant=B/4,size=64,no_noise_prob=0.0,mask_ratio=0.0",
    "variant=B/4,size=64,no_noise_prob=0.0,mask_ratio=0.5",
    "variant=L/2,latent_diffusion=True,size=256",
    "variant=L/16,size=256",
    "variant=B/4,size=64,batch_size=256,beta2=0.999,mask_ratio=0.0,no_noise_prob=0.05,"
    "use_labels=True,epochs=50,area_min=95,wd=0.0," + FINETUNE,
    "variant=B/4,size=64,adaln=False,batch_size=256,beta2=0.999,mask_ratio=0.0,"
    "no_noise_prob=0.05,use_labels=True,epochs=50,area_min=95,wd=0.0," + FINETUNE,
    "variant=L/2,latent_diffusion=True,size=256,batch_size=256,beta2=0.999,mask_ratio=0.0,"
    "no_noise_prob=0.0,use_labels=True,epochs=400,area_min=95,wd=0.0",
] + [f"method={m},variant={v}" for m in sorted(methods.PRESETS)
     for v in ("Ti/4", "S/4", "B/4", "L/4", "H/4")]


@pytest.mark.parametrize("arg", I1K_VARIANTS)
def test_i1k_config_builds_every_variant(arg):
  from big_vision.models import ae
  config = ae_i1k.get_config(arg)
  methods.check_config(config)
  model = ae.build_model(config.model)
  assert model.image_size == tuple(config.diffusion_space[:2])
  assert model.channels == config.diffusion_space[2]


def test_finetune_recipe():
  config = ae_i1k.get_config(FINETUNE)
  assert config.model.num_classes == 1000 and config.mask_ratio == 0.0
  assert config.no_noise_prob == 0.05 and config.optax.b2 == 0.999 and config.wd == 0.0
  assert config.input.batch_size == 256 and config.ema_decay > 0
  assert config.total_epochs == 50
  assert ae_i1k.get_config(FINETUNE + ",no_noise_prob=0.0").no_noise_prob == 0.0


# Seed 002's fine-tuning commands: no_noise_prob 0.05 for UMD and MAE, 0.00 for DiT and
# MaskDiT; the rest of the recipe is shared.
@pytest.mark.parametrize("method,no_noise_prob,adaln", [
    ("umd", 0.05, True), ("mae", 0.05, False), ("dit", 0.0, True), ("maskdit", 0.0, True),
    ("maskdm", 0.0, True)])
def test_finetune_recipe_per_method(method, no_noise_prob, adaln):
  config = ae_i1k.get_config(f"method={method}," + FINETUNE)
  assert config.no_noise_prob == no_noise_prob and config.model.adaln == adaln
  assert config.mask_ratio == 0.0 and config.input.batch_size == 256
  assert config.model.num_classes == 1000


@pytest.mark.parametrize("arg", ["finetune=True", "finetune", "finetune=yes,init_from=''"])
def test_finetune_needs_init_from(arg):
  with pytest.raises(ConfigError, match=r"^finetune=True needs init_from=PRETRAIN_WORKDIR"):
    ae_i1k.get_config(arg)


def test_bare_finetune_flag_is_true():
  # A bare bool option is True, also for the options peeked before parsing (presets).
  config = ae_i1k.get_config("finetune,init_from=/tmp/pretrain")
  assert config.finetune and config.mask_ratio == 0.0 and config.init_from == "/tmp/pretrain"
  assert config_parsing.peek("a=1,scan", "scan", False) is True
  assert config_parsing.peek("scan,scan=False", "scan", True) is False  # The last one wins.
  assert config_parsing.peek("method='mae'", "method", "umd") == "mae"
  assert config_parsing.peek("", "scan", False) is False
  with pytest.raises(ConfigError, match=r"'method' needs a value"):
    config_parsing.peek("method", "method", "umd")


def test_i1k_pipeline_decodes_in_pp():
  # The training data stays encoded through the shuffle buffer: its pp must decode.
  import numpy as np
  import tensorflow as tf
  from big_vision import pp
  config = ae_i1k.get_config("size=32")
  assert tuple(config.input.data.skip_decode) == ("image",)
  for spec in (config.input.pp, config.pp_eval):
    assert spec.split("|")[0].startswith("decode"), spec
    jpeg = tf.io.encode_jpeg(np.random.RandomState(0).randint(0, 256, (40, 48, 3), np.uint8))
    example = {"image": jpeg, "label": tf.constant(3, tf.int64),
               "_seed": tf.constant([1, 2], tf.int64)}
    out = pp.get_preprocess_fn(spec)(example)
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == tf.float32
    assert -1 <= float(tf.reduce_min(out["image"])) <= float(tf.reduce_max(out["image"])) <= 1


def test_latent_diffusion_space():
  config = ae_i1k.get_config("variant=L/2,latent_diffusion=True,size=256")
  assert tuple(config.diffusion_space) == (32, 32, 4)
  assert config.diffusion.schedule == "linear" and not config.diffusion.clip_x0
  with pytest.raises(ConfigError, match="size=256"):
    ae_i1k.get_config("latent_diffusion=True,size=64")


@pytest.mark.parametrize("arg,match", [
    ("mask_ratio=1.0", r"mask_ratio=1.0 must be a finite number in \[0, 1\)"),
    ("mask_ratio=-0.1", r"mask_ratio=-0.1 must be a finite number in \[0, 1\)"),
    ("no_noise_prob=1.5", r"no_noise_prob=1.5 must be a finite number in \[0, 1\]"),
    ("variant=Q/4", r"unknown variant 'Q/4'"),
    ("variant=B/5", r"image size \(64, 64\) is not divisible by the patch size 5"),
    ("remat=sometimes", r"unknown remat_policy 'sometimes'"),
])
def test_check_config_rejects(arg, match):
  with pytest.raises(ConfigError, match=match):
    methods.check_config(ae_i1k.get_config(arg))


def test_cli_overrides():
  config, rest = config_cli.load_from_argv(
      ["--config", "configs/ae_i1k.py:variant=S/4", "--config.model.variant=B/4",
       "--config.mask_ratio", "0.5", "--workdir", "/tmp/x"])
  assert config.model.variant == "B/4" and config.mask_ratio == 0.5
  assert rest == ["--workdir", "/tmp/x"]
  with pytest.raises(ConfigError, match=r"'model' has no field 'varient'.*variant"):
    config_cli.load_from_argv(["--config=configs/ae_i1k.py", "--config.model.varient=B/4"])
  with pytest.raises(ConfigError, match=r"config.mask_ratio' expects a float"):
    config_cli.load_from_argv(["--config=configs/ae_i1k.py", "--config.mask_ratio=half"])
  with pytest.raises(ConfigError, match=r"does not exist"):
    config_cli.load_from_argv(["--config=configs/nope.py"])
  # An evaluator's options that its config leaves at their defaults can be set too (the
  # evaluator checks them when built); an eval the config does not have cannot.
  config, _ = config_cli.load_from_argv(
      ["--config=configs/ae_fmnist.py", "--config.evals.reconstruction.t=250",
       "--config.evals.samples.num_grid=0", "--config.evals.reconstruction.name=recon"])
  assert (config.evals.reconstruction.t, config.evals.samples.num_grid) == (250, 0)
  assert config.evals.reconstruction.name == "recon"
  with pytest.raises(ConfigError, match=r"'evals' has no field 'recon'; it has: .*samples"):
    config_cli.load_from_argv(["--config=configs/ae_fmnist.py", "--config.evals.recon.t=1"])


def test_i1k_evals_follow_the_method():
  umd = ae_i1k.get_config("")
  assert set(umd.evals) == {"fewshot", "val", "reconstruction"}
  assert umd.evals.fewshot.every_steps == 10_000 and umd.evals.fewshot.shots == (10, 25, 100)
  assert ae_i1k.get_config("method=dit").evals.fewshot.features == "noised"
  assert "val" not in ae_i1k.get_config("method=mae").evals
  finetune = ae_i1k.get_config(FINETUNE)
  assert finetune.evals.samples.guidance_scales == (1.0, 2.0, 4.0)
  assert finetune.evals.samples.feature_net.kind == "inception"


@pytest.mark.parametrize("config_name", ["ae_fmnist", "ae_i1k"])
@pytest.mark.parametrize("timesteps,t", [(1000, 100), (50, 5), (5, 0)])
def test_fewshot_noise_step_follows_timesteps(monkeypatch, config_name, timesteps, t):
  # A 'noised' probe at t=100 would not start with timesteps=50.
  import importlib
  from big_vision import diffusion as diffusion_lib
  from big_vision import sharding
  from big_vision.evaluators import common
  from big_vision.evaluators import fewshot
  from big_vision.models import ae
  monkeypatch.setattr(common, "eval_input_config", lambda *a, **k: {})
  get_config = importlib.import_module(f"configs.{config_name}").get_config
  config = get_config(f"method=dit,variant=Mu/4,timesteps={timesteps},sampling_timesteps=5")
  spec = dict(config.evals.fewshot)
  assert spec.pop("type") == "fewshot" and spec["features"] == "noised"
  spec.pop("every_steps", None), spec.pop("every_epochs", None)
  model = ae.build_model(config.model)
  context = common.Context(model=model, config=config, workdir="", mesh=sharding.make_mesh(),
                           diffusion=diffusion_lib.GaussianDiffusion.create("cosine", timesteps),
                           data_sharding=None)
  assert fewshot.Evaluator(context, **spec).t == t


def test_i1k_fewshot_split_holds_enough_per_class():
  # Every class needs holdout_per_class + max(shots) images of the probe's train_split;
  # 1.5x that on average leaves room for ImageNet's unequal classes (732-1300 images).
  import inspect
  import re
  from big_vision.evaluators import fewshot
  spec = ae_i1k.get_config("").evals.fewshot
  defaults = inspect.signature(fewshot.Evaluator).parameters
  holdout = spec.get("holdout_per_class", defaults["holdout_per_class"].default)
  shots = spec.get("shots", defaults["shots"].default)
  count = int(re.fullmatch(r"train\[:(\d+)\]", spec.train_split).group(1))
  assert count / 1000 >= 1.5 * (holdout + max(shots)), (spec.train_split, holdout, shots)


def test_few_shot_checks_every_class_before_fitting():
  from big_vision.evaluators import linear_probe
  y = [0] * 50 + [1] * 29 + [2] * 50
  x = [[float(v)] for v in y]
  with pytest.raises(ConfigError, match=r"class 1 has 29 training examples, fewer than "
                     r"holdout_per_class=20 \+ max\(shots\)=10 = 30; use a larger train_split"):
    linear_probe.few_shot(x, y, x, y, shots=(5, 10), holdout_per_class=20)
  # A class only in the test split has no training examples at all.
  with pytest.raises(ConfigError, match=r"class 3 has 0 training examples"):
    linear_probe.few_shot(x, y, [[0.0]], [3], shots=(1,), holdout_per_class=1)


def _with(arg, **fields):
  """The i1k config from `arg`, with dotted fields set afterwards (as --config.x=...)."""
  config = ae_i1k.get_config(arg)
  for dotted, value in fields.items():
    *path, leaf = dotted.split("__")
    node = config
    for key in path:
      node = node[key]
    if leaf in node:  # Deleted first: ConfigDict keeps a field's type otherwise.
      del node[leaf]
    node[leaf] = value
  return config


@pytest.mark.parametrize("arg,fields,match", [
    ("schedule=sigmoid", {}, r"diffusion.schedule='sigmoid', diffusion.timesteps=1000: "
     r"unknown beta schedule 'sigmoid'; allowed: cosine, linear, quadratic"),
    ("timesteps=0", {}, r"diffusion.timesteps=0: num_timesteps=0 must be an int >= 1"),
    ("", dict(diffusion__timesteps=1000.0), r"diffusion.timesteps=1000.0: .* must be an int"),
    ("schedule=linear,timesteps=20,sampling_timesteps=10", {},
     r"diffusion.timesteps=20: 'linear' schedule .* use num_timesteps >= 21 or 'cosine'"),
    ("schedule=quadratic,timesteps=5,sampling_timesteps=5", {},
     r"diffusion.timesteps=5: 'quadratic' schedule .* use num_timesteps >= 21"),
    ("sampling_timesteps=0", {}, r"diffusion.sampling_timesteps=0 must be an int in "
     r"\[1, 1000\]"),
    ("timesteps=100", {}, r"diffusion.sampling_timesteps=125 must be an int in \[1, 100\]"),
    ("", dict(diffusion__eta=-0.5), r"diffusion.eta=-0.5 must be a finite number in "
     r"\[0, inf\) \(0: deterministic DDIM, 1: DDPM-like\)"),
    (FINETUNE, dict(evals__samples__sampling_timesteps=1001),
     r"evals.samples.sampling_timesteps=1001 must be an int in \[1, 1000\]"),
    ("", dict(evals__inp=dict(type="inpainting", sampling_timesteps=0)),
     r"evals.inp.sampling_timesteps=0 must be an int in \[1, 1000\]"),
    ("", dict(evals__inp=dict(type="inpainting", eta=-1.0)), r"evals.inp.eta=-1.0 must be"),
    ("grad_accum=0", {}, r"grad_accum_steps=0 must be an int >= 1"),
    ("grad_accum=-2", {}, r"grad_accum_steps=-2 must be an int >= 1"),
    ("", dict(grad_accum_steps=2.0), r"grad_accum_steps=2.0 must be an int >= 1"),
    ("grad_accum=3", {}, r"batch_size=1024 is not divisible by grad_accum_steps=3"),
])
def test_check_config_rejects_diffusion_and_accumulation(arg, fields, match):
  with pytest.raises(ConfigError, match=match):
    methods.check_config(_with(arg, **fields))


def test_check_config_accepts_sampling_options():
  config = _with(FINETUNE + ",schedule=linear,timesteps=21,sampling_timesteps=21",
                 evals__samples__sampling_timesteps=1, evals__samples__eta=1.0,
                 grad_accum_steps=4)
  methods.check_config(config)


def test_sampling_eta_defaults_to_the_diffusion_section(monkeypatch):
  # Builds the evaluator only (nothing is sampled or compiled): no data or weights needed.
  from big_vision import diffusion as diffusion_lib
  from big_vision.evaluators import common
  from big_vision.evaluators import sampling
  from big_vision import sharding
  from big_vision.models import ae
  monkeypatch.setattr(common, "eval_input_config", lambda *a, **k: {})
  config = ae_i1k.get_config("variant=Ti/4,size=32")
  config.diffusion.eta = 0.5
  context = common.Context(model=ae.build_model(config.model),
                           diffusion=diffusion_lib.GaussianDiffusion.create("cosine", 10),
                           config=config, workdir="", mesh=sharding.make_mesh(),
                           data_sharding=None)
  assert sampling.Evaluator(context).eta == 0.5
  assert sampling.Evaluator(context, eta=0.0).eta == 0.0  # An explicit option wins.
  del config.diffusion["eta"]
  assert sampling.Evaluator(context).eta == 0.0
