"""Bad model options are one clear ConfigError naming the value."""
import pytest

from big_vision.config_parsing import ConfigError
from big_vision.models import ae


@pytest.mark.parametrize("option,value,match", [
    ("image_size", 0, r"image_size=0 must be a positive int or a pair of them"),
    ("image_size", (16, -16), r"image_size=\(16, -16\) must be a positive int"),
    ("image_size", "16", r"image_size='16' must be a positive int"),
    ("channels", 0, r"channels=0 must be an int >= 1"),
    ("num_cls_tokens", -1, r"num_cls_tokens=-1 must be an int >= 0"),
    ("num_classes", 2.5, r"num_classes=2.5 must be an int >= 0"),
    ("decoder_depth", -1, r"decoder_depth=-1 must be an int >= 0"),
    ("decoder_mlp_dim", 0, r"decoder_mlp_dim=0 must be an int >= 1"),
])
def test_bad_model_option_is_clear(option, value, match):
  with pytest.raises(ConfigError, match=match):
    ae.build_model({"variant": "Mu/4", "image_size": 16, option: value})


def test_good_model_options_still_build():
  m = ae.build_model(dict(variant="Mu/4", image_size=(16, 8), channels=1, num_cls_tokens=0,
                          num_classes=0, decoder_depth=1, decoder_mlp_dim=32))
  assert m.grid == (4, 2) and m.num_cls_tokens == 0


def test_block_masking_config_masks_whole_blocks():
  # MaskDM's block masking is a config option; one forward pass masks whole blocks.
  import jax
  import jax.numpy as jnp
  import numpy as np
  from big_vision import methods
  from configs import ae_i1k
  config = ae_i1k.get_config("variant=Mu/4,size=32,masking=block,mask_block_size=4,"
                             "decoder_depth=1,dtype_mm=float32,attention=xla")
  methods.check_config(config)
  model = ae.build_model(config.model)
  assert (model.masking, model.mask_block_size, model.grid) == ("block", 4, (8, 8))
  b, k = 2, 4
  x, t = jnp.zeros((b, 32, 32, 3)), jnp.zeros((b,), jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)}
  apply = jax.jit(lambda v: model.apply(v, x, t, mask_ratio=0.5, rngs=rngs)["mask"])
  mask = np.asarray(apply(jax.jit(lambda: model.init(rngs, x, t))()))
  blocks = mask.reshape(b, 2, k, 2, k).transpose(0, 1, 3, 2, 4).reshape(b, 4, k * k)
  assert np.all(blocks.min(-1) == blocks.max(-1))  # Whole blocks, masked or not.
  np.testing.assert_array_equal(blocks[..., 0].sum(1), 2)  # Half of the 4 blocks.


def test_posemb_and_decoder_mlp_dim_config_options():
  from configs import ae_fmnist
  config = ae_fmnist.get_config("variant=Mu/2,posemb=learn,decoder_mlp_dim=32")
  params = ae.init_shapes(ae.build_model(config.model))  # Shapes only: nothing runs.
  assert params["pos_embedding"].shape == (1, 196, 64)
  assert params["decoder"]["block_00"]["mlp"]["fc1"]["kernel"].shape[-1] == 32
  default = ae_fmnist.get_config("").model  # 0: the model's own 4 x decoder width.
  assert default.decoder_mlp_dim is None and ae.build_model(default).decoder_mlp_dim is None


def test_model_options_from_the_command_line():
  from big_vision import config_cli
  config, _ = config_cli.load_from_argv(
      ["--config=configs/ae_i1k.py:variant=Mu/4", "--config.model.masking=block",
       "--config.model.mask_block_size=2", "--config.model.posemb=learn",
       "--config.model.decoder_mlp_dim=64"])
  m = ae.build_model(config.model)
  assert (m.masking, m.mask_block_size, m.posemb, m.decoder_mlp_dim) == ("block", 2, "learn", 64)


@pytest.mark.parametrize("arg,match", [
    ("masking=block,mask_block_size=3", r"mask_block_size=3 does not divide the patch grid "
                                        r"16x16; use a divisor of both"),
    ("masking=block,mask_block_size=0", r"mask_block_size=0 must be an int >= 1"),
    ("masking=blocks", r"unknown masking 'blocks'; known: random, block"),
    ("posemb=rope", r"unknown posemb 'rope'; known: sincos2d, learn"),
    ("decoder_mlp_dim=-8", r"decoder_mlp_dim=-8 must be an int >= 1"),
])
def test_bad_config_option_is_one_line(arg, match):
  from big_vision import methods
  from configs import ae_i1k
  with pytest.raises(ConfigError, match=rf"^{match}$"):
    methods.check_config(ae_i1k.get_config(arg))


@pytest.mark.parametrize("cfg,ratios,match", [
    (dict(variant="Mu/28", image_size=28), dict(mask_ratio=0.375),
     r"mask_ratio=0.375 masks none of the 1 tokens; one token must stay visible"),
    (dict(variant="Mu/4", image_size=32, masking="block", mask_block_size=4),
     dict(mask_ratio=0.5, mask_ratio_no_noise=0.2),
     r"mask_ratio_no_noise=0.2 masks none of the 4 blocks \(2x2 blocks of 4x4 patches\); the "
     r"smallest ratio that masks one block is 1/4 = 0.25"),
])
def test_check_model_config_names_a_ratio_that_masks_nothing(cfg, ratios, match):
  with pytest.raises(ConfigError, match=rf"^{match}"):
    ae.check_model_config(cfg, **ratios)
  ae.check_model_config(cfg, **{name: 0.0 for name in ratios})  # Zero: no masking, fine.


def test_model_with_one_patch_refuses_to_mask_it():
  # Was: nothing masked and a clean loss of exactly 0. Ratio 0 still runs.
  import jax
  import jax.numpy as jnp
  model = ae.build_model(dict(variant="Mu/28", image_size=28, channels=1))
  x, t = jnp.zeros((2, 28, 28, 1)), jnp.zeros((2,), jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)}
  variables = jax.eval_shape(lambda: model.init(rngs, x, t))  # Traced only: no compiling.
  with pytest.raises(ValueError, match=r"mask_ratio=0.75 masks none of the 1 tokens"):
    jax.eval_shape(lambda v: model.apply(v, x, t, mask_ratio=0.75, rngs=rngs), variables)
  jax.eval_shape(lambda v: model.apply(v, x, t, mask_ratio=0.0, rngs=rngs), variables)
