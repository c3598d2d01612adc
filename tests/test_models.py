"""The generic auto-encoder: sizes, every method preset, masking, conditioning, scan."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision import methods
from big_vision.config_parsing import ConfigError
from big_vision.models import ae
from big_vision.models import masking
from configs import ae_i1k

RNGS = {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1),
        "dropout": jax.random.PRNGKey(2)}

# Encoder parameter counts of the DiffMAE size table (plain ViT encoders at 224/16).
TABLE = {"Ti": 5.7e6, "S": 22e6, "B": 86e6, "L": 304e6, "H": 632e6}


@pytest.mark.parametrize("size", sorted(TABLE))
def test_encoder_sizes_match_table(size):
  model = ae.build_model(dict(variant=f"{size}/16", image_size=224, adaln=False))
  params = ae.init_shapes(model)
  encoder = sum(ae.count_params(params[k]) for k in ("patch_embedding", "cls", "encoder",
                                                      "encoder_norm"))
  assert abs(encoder / TABLE[size] - 1) < 0.05, (size, encoder)


def test_variant_table_decoder_sizes():
  assert ae.decode_variant("Ti/4")["decoder_width"] == 96
  assert ae.decode_variant("B/4")["decoder_depth"] == 8
  assert ae.decode_variant("H/14") == dict(width=1280, depth=32, mlp_dim=5120, num_heads=16,
                                            decoder_width=640, decoder_depth=8, patch_size=14)


@pytest.mark.parametrize("variant", ["Q/4", "B", "B/x", "b/4", ""])
def test_unknown_variant(variant):
  with pytest.raises(ConfigError, match="unknown variant"):
    ae.decode_variant(variant)


def _perturbed(params, scale=0.05, seed=7):
  """Non-zero everywhere, so zero-initialised AdaLN/heads do not hide bugs. (numpy's
  generator: jax.random, run eagerly, compiles a program for each parameter shape.)"""
  noise = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: x + scale * noise.normal(size=x.shape).astype(x.dtype),
                                params)


def _images(b=3, size=16, c=3, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, size, size, c), minval=-1, maxval=1)


@pytest.mark.parametrize("method", sorted(methods.PRESETS))
def test_every_method_preset_forward(method):
  # MaskDM's 4x4 blocks of patches would be the whole 4x4 grid here: blocks of 2x2.
  blocks = ",mask_block_size=2" if method == "maskdm" else ""
  config = ae_i1k.get_config(f"method={method},variant=Mu/4,size=16,use_labels=True{blocks}")
  model = ae.build_model(config.model)
  x = _images()
  t = jnp.array([0, 1, 500])
  labels = jnp.array([1, 2, 999])
  params = model.init(RNGS, x, t, labels, mask_ratio=config.mask_ratio)["params"]
  n = model.num_patches
  for ratio in (config.mask_ratio, config.mask_ratio_no_noise):
    queries = dict(noised=-x) if method == "diffmae" else {}  # DiffMAE's noised images.
    out = model.apply({"params": params}, x, t, labels, mask_ratio=ratio, train=True, rngs=RNGS,
                      **queries)
    assert out["x0"].shape == x.shape and out["eps"].shape == x.shape
    assert out["mask"].shape == (3, n)
    np.testing.assert_array_equal(out["mask"].sum(1), n - masking.num_kept(n, ratio))
  rep = model.apply({"params": params}, x, method=model.representation)
  assert rep.shape == (3, model.width)


def test_masked_patches_are_invisible_to_the_model():
  model = ae.build_model(dict(variant="Mu/4", image_size=16))
  x = _images()
  t = jnp.array([3, 3, 3])
  params = _perturbed(model.init(RNGS, x, t, mask_ratio=0.5)["params"])
  m = masking.random_masking(jax.random.PRNGKey(5), 3, model.num_patches, 0.5)
  pixel_mask = masking.mask_to_pixels(m.mask, model.grid, model.patch_size)
  x2 = jnp.where(pixel_mask > 0, 5.0, x)  # Change only masked pixels.
  out1 = model.apply({"params": params}, x, t, masking=m)
  out2 = model.apply({"params": params}, x2, t, masking=m)
  np.testing.assert_allclose(out1["x0"], out2["x0"], atol=1e-5)
  x3 = jnp.where(pixel_mask > 0, x, 5.0)  # Change visible pixels: output must change.
  out3 = model.apply({"params": params}, x3, t, masking=m)
  assert np.abs(out3["x0"] - out1["x0"]).max() > 1e-3


@pytest.mark.parametrize("adaln,decoder_attention", [
    (True, "joint"), (False, "joint"), (False, "cross_self"), (False, "cross")])
def test_diffmae_sees_clean_visible_and_noised_masked_patches(adaln, decoder_attention):
  """DiffMAE's queries: the encoder reads the clean images' visible patches only, the
  decoder the noised images' masked patches only, and t only through the decoder; with
  each of its decoders."""
  model = ae.build_model(dict(variant="Mu/4", image_size=16, adaln=adaln,
                              decoder_queries="noised_patches",
                              decoder_attention=decoder_attention))
  x, noised = _images(), _images(seed=1)
  t = jnp.array([3, 300, 900])
  params = _perturbed(model.init(RNGS, x, t, mask_ratio=0.5)["params"])
  assert "query_embedding" in params and "mask_token" not in params
  m = masking.random_masking(jax.random.PRNGKey(5), 3, model.num_patches, 0.5)
  pixel_mask = masking.mask_to_pixels(m.mask, model.grid, model.patch_size)
  out = lambda images, noised, t=t: model.apply({"params": params}, images, t, masking=m,
                                                noised=noised)["x0"]
  base = out(x, noised)
  changed = lambda a, b: float(jnp.abs(a - b).max())
  # The clean masked pixels (the answer) and the noised visible ones reach nothing.
  assert changed(out(jnp.where(pixel_mask > 0, 5.0, x), noised), base) < 1e-5
  assert changed(out(x, jnp.where(pixel_mask > 0, noised, 5.0)), base) < 1e-5
  # The clean visible and the noised masked pixels do, and so does t.
  assert changed(out(jnp.where(pixel_mask > 0, x, 5.0), noised), base) > 1e-3
  assert changed(out(x, jnp.where(pixel_mask > 0, 5.0, noised)), base) > 1e-3
  assert changed(out(x, noised, t=jnp.array([3, 300, 100])), base) > 1e-3
  # The encoder is conditioned on t = 0 whatever t is: it sees clean patches.
  def encoder_output(t):
    _, state = model.apply({"params": params}, x, t, masking=m, noised=noised,
                           capture_intermediates=lambda mdl, _: mdl.name == "encoder_norm",
                           mutable=["intermediates"])
    return state["intermediates"]["encoder_norm"]["__call__"][0]
  np.testing.assert_allclose(encoder_output(t), encoder_output(jnp.zeros(3, jnp.int32)),
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"needs noised="):
    model.apply({"params": params}, x, t, masking=m)
  if decoder_attention != "joint":  # Only the masked patches are predicted.
    np.testing.assert_array_equal(np.where(pixel_mask > 0, 0.0, base), 0.0)
    assert "cross_attn" in params["decoder"]["block_00"]
    assert ("attn" in params["decoder"]["block_00"]) == (decoder_attention == "cross_self")


def test_noised_is_only_for_diffmae():
  model = ae.build_model(dict(variant="Mu/4", image_size=16))
  x, t = _images(b=2), jnp.array([1, 2])
  params = model.init(RNGS, x, t)["params"]
  with pytest.raises(ValueError, match=r"noised= is DiffMAE's input"):
    model.apply({"params": params}, x, t, noised=x)


@pytest.mark.parametrize("adaln", [True, False])
def test_time_conditioning_changes_output(adaln):
  model = ae.build_model(dict(variant="Mu/4", image_size=16, adaln=adaln))
  x = _images(b=2)
  params = _perturbed(model.init(RNGS, x, jnp.zeros(2, jnp.int32))["params"])
  a = model.apply({"params": params}, x, jnp.array([0, 0]))
  b = model.apply({"params": params}, x, jnp.array([0, 700]))
  np.testing.assert_allclose(a["eps"][0], b["eps"][0], atol=1e-5)
  assert np.abs(a["eps"][1] - b["eps"][1]).max() > 1e-3


def test_adaln_zero_init_starts_at_zero_output():
  model = ae.build_model(dict(variant="Mu/4", image_size=16))
  x = _images(b=2)
  variables = model.init(RNGS, x, jnp.array([0, 9]))
  out = model.apply(variables, x, jnp.array([0, 9]))
  np.testing.assert_array_equal(out["x0"], 0.0)
  # AdaLN-Zero: every block's modulation starts at zero.
  block = variables["params"]["encoder"]["block_00"]["adaln_modulation"]
  np.testing.assert_array_equal(block["kernel"], 0.0)


def test_labels_and_null_class():
  """Label dropout is the objective's (tests/test_objective.py); the model has a null class."""
  model = ae.build_model(dict(variant="Mu/4", image_size=16, num_classes=10))
  x = _images(b=4)
  t = jnp.zeros(4, jnp.int32)
  params = _perturbed(model.init(RNGS, x, t, jnp.zeros(4, jnp.int32))["params"])
  assert params["y_embedder"]["table"]["embedding"].shape == (11, model.width)
  apply = lambda labels, **kw: model.apply({"params": params}, x, t, labels, **kw)["eps"]
  null = apply(None)
  np.testing.assert_allclose(null, apply(jnp.full(4, 10)), atol=1e-6)
  cond = apply(jnp.full(4, 3))
  assert np.abs(cond - null).max() > 1e-3
  # train=True drops no labels: the model has no label dropout of its own.
  np.testing.assert_array_equal(apply(jnp.full(4, 3), train=True, rngs=RNGS), cond)


def _stack_blocks(params, depth):
  """Unrolled block_00..block_N params -> the scanned layout (leading depth axis)."""
  blocks = [params[f"block_{i:02d}"] for i in range(depth)]
  return {"blocks": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}


def _masked_loss_and_grads(model, params, x, t):
  """A loss of both outputs at mask ratio 0.5, and its gradients."""
  queries = dict(noised=-x) if model.decoder_queries == "noised_patches" else {}
  def loss(p):
    out = model.apply({"params": p}, x, t, mask_ratio=0.5, rngs=RNGS, **queries)
    return jnp.mean(out["eps"] ** 2 + out["x0"] ** 2)
  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("kw", [
    dict(variant="Mu/4", image_size=16),
    dict(variant="Mu/4", image_size=16, adaln=False, decoder_queries="noised_patches",
         decoder_attention="cross_self")])  # The context is broadcast to every block.
def test_scan_and_remat_match_unrolled(kw):
  plain = ae.build_model(kw)
  scanned = ae.build_model(dict(kw, scan=True, remat_policy="nothing_saveable"))
  x, t = _images(), jnp.array([0, 10, 999])
  params = _perturbed(plain.init(RNGS, x, t)["params"])
  params = flax.core.unfreeze(params)
  sparams = dict(params)
  sparams["encoder"] = _stack_blocks(params["encoder"], plain.depth)
  sparams["decoder"] = _stack_blocks(params["decoder"], plain.decoder_depth)

  l1, g1 = _masked_loss_and_grads(plain, params, x, t)
  l2, g2 = _masked_loss_and_grads(scanned, sparams, x, t)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  np.testing.assert_allclose(g1["encoder"]["block_01"]["mlp"]["fc1"]["kernel"],
                             g2["encoder"]["blocks"]["mlp"]["fc1"]["kernel"][1],
                             rtol=1e-4, atol=1e-7)


def _residual_bytes(model, params, x, t, **queries):
  """Bytes the backward pass of the model's loss keeps from its forward pass (traced only:
  the leaves of jax.vjp's backward function are those residuals)."""
  loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, mask_ratio=0.5, rngs=RNGS,
                                        **queries)["eps"])
  residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(residuals))


def loss_and_grads_as_written_and_with(monkeypatch, module, name, replacement):
  """A Mu/4 model's masked loss and gradients ((loss, grads) pairs): as written, then with
  module.name replaced (e.g. a hand-written backward pass by autodiff's), traced anew."""
  model = ae.build_model(dict(variant="Mu/4", image_size=16, decoder_depth=1))
  x, t = _images(), jnp.array([0, 50, 999])
  params = _perturbed(jax.jit(model.init)(RNGS, x, t)["params"])
  # A new function each time: jit traces it anew, with whatever module.name is then.
  run = lambda: jax.jit(lambda p: _masked_loss_and_grads(model, p, x, t))(params)
  as_written = run()
  calls = []
  monkeypatch.setattr(module, name, lambda *a: calls.append(1) or replacement(*a))
  replaced = run()
  assert calls, f"the model never called {module.__name__}.{name}"
  return as_written, replaced


def _cost(jitted, *args):
  """XLA's FLOP count of a jitted function's compiled program."""
  cost = jitted.lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("adaln", [True, False])
def test_elementwise_remat_matches_plain_and_keeps_less(adaln):
  """remat_policy="elementwise" recomputes GELU's output (fc2's input) in the backward
  pass: the same loss, gradients and FLOPs (fc2's matmul is not recomputed), and the
  backward pass keeps one [batch, tokens, mlp_dim] float32 array less per block."""
  kw = dict(variant="Mu/4", image_size=16, adaln=adaln)
  plain, remat = ae.build_model(kw), ae.build_model(dict(kw, remat_policy="elementwise"))
  x, t = _images(), jnp.array([0, 10, 999])
  params = _perturbed(plain.init(RNGS, x, t)["params"])
  assert (jax.tree_util.tree_structure(remat.init(RNGS, x, t)["params"])
          == jax.tree_util.tree_structure(params))

  l1, g1 = _masked_loss_and_grads(plain, params, x, t)
  l2, g2 = _masked_loss_and_grads(remat, params, x, t)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         g1, g2)
  kept, kept_remat = _residual_bytes(plain, params, x, t), _residual_bytes(remat, params, x, t)
  batch, visible, cls = 3, 8, plain.num_cls_tokens  # Mask ratio 0.5 of 4 x 4 patches.
  mlp_outputs = (plain.depth * batch * (cls + visible) * plain.mlp_dim
                 + plain.decoder_depth * batch * (cls + 16) * 4 * plain.decoder_width)
  assert kept - kept_remat == 4 * mlp_outputs, (kept, kept_remat, 4 * mlp_outputs)
  flops = lambda m: _cost(jax.jit(lambda p: _masked_loss_and_grads(m, p, x, t)), params)
  assert flops(remat) == flops(plain)


@pytest.mark.parametrize("kw", [dict(adaln=True), dict(
    adaln=False, decoder_queries="noised_patches", decoder_attention="cross_self")])
def test_autodiff_backward_is_the_same_function_keeping_more(kw):
  """autodiff_backward=True (to compare): JAX's autodiff for GELU, the LayerNorms and the
  softmax gives the same loss and gradients, and keeps more for the backward pass."""
  kw = dict(variant="Mu/4", image_size=16, **kw)
  ours, autodiff = ae.build_model(kw), ae.build_model(dict(kw, autodiff_backward=True))
  x, t = _images(), jnp.array([0, 10, 999])
  params = _perturbed(ours.init(RNGS, x, t, mask_ratio=0.5)["params"])
  (l1, g1), (l2, g2) = (_masked_loss_and_grads(m, params, x, t) for m in (ours, autodiff))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                         g1, g2)
  queries = dict(noised=-x) if ours.noised_queries else {}
  kept = [_residual_bytes(m, params, x, t, **queries) for m in (ours, autodiff)]
  assert kept[0] < 0.8 * kept[1], kept


def test_token_dense_is_dense():
  """The flat-matmul Dense has nn.Dense's parameters, outputs and gradients."""
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 8))
  dense, token_dense = ae.dense_module(False)(6), ae.dense_module(True)(6)
  params = dense.init(jax.random.PRNGKey(4), x)
  assert (jax.tree_util.tree_map(jnp.shape, token_dense.init(jax.random.PRNGKey(4), x))
          == jax.tree_util.tree_map(jnp.shape, params))

  def loss(module, p, x):
    return jnp.sum(jnp.sin(module.apply(p, x)))

  for argnums in (1, 2):
    want = jax.grad(loss, argnums)(dense, params, x)
    got = jax.grad(loss, argnums)(token_dense, params, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                   atol=1e-6), want, got)
  np.testing.assert_allclose(token_dense.apply(params, x), dense.apply(params, x),
                             rtol=1e-5, atol=1e-6)
  assert token_dense.apply(params, x).shape == (3, 5, 6)


def test_flat_dense_model_matches_nn_dense_model():
  """The default model (flat_dense) computes the loss and gradients of nn.Dense's."""
  x, t = _images(), jnp.array([0, 10, 999])
  kw = dict(variant="Mu/4", image_size=16)
  flat, plain = ae.build_model(kw), ae.build_model(dict(kw, flat_dense=False))
  assert flat.flat_dense and not plain.flat_dense
  params = _perturbed(plain.init(RNGS, x, t)["params"])

  l1, g1 = _masked_loss_and_grads(plain, params, x, t)
  l2, g2 = _masked_loss_and_grads(flat, params, x, t)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                         g1, g2)


def test_bfloat16_matmuls_close_to_float32():
  x, t = _images(), jnp.array([0, 10, 999])
  m32 = ae.build_model(dict(variant="Mu/4", image_size=16))
  m16 = ae.build_model(dict(variant="Mu/4", image_size=16, dtype_mm="bfloat16"))
  params = _perturbed(m32.init(RNGS, x, t)["params"])
  a = m32.apply({"params": params}, x, t)["eps"]
  b = m16.apply({"params": params}, x, t)["eps"]
  assert b.dtype == jnp.float32
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3


def test_bfloat16_residual_stream_close_to_float32():
  x, t = _images(), jnp.array([0, 10, 999])
  m32 = ae.build_model(dict(variant="Mu/4", image_size=16))
  m16 = ae.build_model(dict(variant="Mu/4", image_size=16, dtype_mm="bfloat16",
                            dtype_activations="bfloat16"))
  params = _perturbed(m32.init(RNGS, x, t)["params"])
  a = m32.apply({"params": params}, x, t)["eps"]
  b = m16.apply({"params": params}, x, t)["eps"]
  assert b.dtype == jnp.float32
  assert 0 < np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3


def test_xla_attention_keeps_only_the_probabilities():
  """The attention core's backward pass keeps one [B, heads, T, S] float32 array (the
  softmax's output), where jax's default softmax derivative keeps two; the same values
  and gradients."""
  b, t, s, heads, dim = 2, 5, 7, 3, 8
  q, k, v = (jax.random.normal(key, (b, length, heads, dim)) for key, length in
             zip(jax.random.split(jax.random.PRNGKey(0), 3), (t, s, s)))
  weights = jax.random.normal(jax.random.PRNGKey(1), (b, t, heads, dim))

  def reference(q, k, v, implementation):
    with jax.softmax_custom_jvp(False):  # jax's default (0.10): autodiff of exp / sum.
      return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

  def loss_and_grads(fn):
    loss = lambda *qkv: jnp.sum(jnp.sin(fn(*qkv, "xla")) * weights)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  def kept(fn):  # The backward pass's arrays of the attention matrix's size.
    backward = jax.eval_shape(lambda *qkv: jax.vjp(lambda *a: fn(*a, "xla"), *qkv)[1], q, k, v)
    return [l.dtype for l in jax.tree_util.tree_leaves(backward) if l.size == b * heads * t * s]

  (got_loss, got), (want_loss, want) = (loss_and_grads(f) for f in (ae.attention_core,
                                                                     reference))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert kept(ae.attention_core) == [jnp.float32]
  assert kept(reference) == [jnp.float32] * 2


def test_model_loss_and_gradients_match_default_softmax_derivative(monkeypatch):
  (got_loss, got), (want_loss, want) = loss_and_grads_as_written_and_with(
      monkeypatch, ae, "attention_core", lambda q, k, v, implementation, autodiff:
      jax.nn.dot_product_attention(q, k, v, implementation=implementation))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7),
                         got, want)


@pytest.mark.skipif(ae.cudnn_attention_available(), reason="this GPU runs cuDNN's attention")
def test_attention_auto_is_xla_off_gpu():
  """On a CPU 'auto' must pick XLA's attention and compute exactly what 'xla' computes."""
  x, t = _images(), jnp.array([0, 10, 999])
  models = [ae.build_model(dict(variant="Mu/4", image_size=16, dtype_mm="bfloat16",
                                attention=a)) for a in ("xla", "auto")]
  params = _perturbed(models[0].init(RNGS, x, t)["params"])
  a, b = (m.apply({"params": params}, x, t)["eps"] for m in models)
  assert ae.attention_implementation("auto", jnp.bfloat16) == "xla"
  np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not ae.cudnn_attention_available(),
                    reason="cuDNN's fused attention needs an NVIDIA GPU (sm80+)")
def test_cudnn_attention_matches_xla_on_gpu():
  """Same outputs and gradients as XLA's attention, to bfloat16 tolerance."""
  x, t = _images(b=4), jnp.array([0, 10, 500, 999])
  models = [ae.build_model(dict(variant="Mu/4", image_size=16, dtype_mm="bfloat16",
                                attention=a)) for a in ("xla", "cudnn")]
  params = _perturbed(models[0].init(RNGS, x, t)["params"])

  def loss(params, model):
    out = model.apply({"params": params}, x, t, mask_ratio=0.5, rngs=RNGS)
    return jnp.mean(jnp.square(out["eps"])) + jnp.mean(jnp.square(out["x0"]))
  (la, ga), (lb, gb) = (jax.value_and_grad(loss)(params, m) for m in models)
  np.testing.assert_allclose(la, lb, rtol=2e-2)
  for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-6


@pytest.mark.skipif(ae.cudnn_attention_available(), reason="this GPU runs cuDNN's attention")
def test_cudnn_attention_off_gpu_is_a_clear_error():
  model = ae.build_model(dict(variant="Mu/4", image_size=16, dtype_mm="bfloat16",
                              attention="cudnn"))
  with pytest.raises(ConfigError, match="attention='cudnn' needs an NVIDIA GPU"):
    model.init(RNGS, _images(), jnp.zeros(3, jnp.int32))


def test_representation_is_clean_unmasked_and_deterministic():
  model = ae.build_model(dict(variant="Mu/4", image_size=16, num_cls_tokens=2))
  x = _images()
  params = _perturbed(model.init(RNGS, x, jnp.zeros(3, jnp.int32))["params"])
  rep = model.apply({"params": params}, x, method=model.representation)
  assert rep.shape == (3, 64)
  np.testing.assert_allclose(rep, model.apply({"params": params}, x,
                                              method=model.representation))
  # One image's features do not depend on the others in the batch.
  np.testing.assert_allclose(rep[:1], model.apply({"params": params}, x[:1],
                                                  method=model.representation), atol=1e-5)


@pytest.mark.parametrize("cfg,match", [
    (dict(variant="B/4", image_size=30), r"image size \(30, 30\) is not divisible by the patch"),
    (dict(variant="B/4", image_size=64, masking="block", mask_block_size=3),
     "mask_block_size=3 does not divide the patch grid 16x16"),
    (dict(variant="B/4", image_size=64, dtype_mm="fp8"), "unknown dtype_mm 'fp8'"),
    (dict(variant="B/4", image_size=64, dtype_activations="fp8"),
     "unknown dtype_activations 'fp8'"),
    (dict(variant="B/4", image_size=64, attention="flash"),
     "unknown attention 'flash'; known: auto, xla, cudnn"),
    (dict(variant="B/4", image_size=64, flat_dense="yes"),
     "flat_dense must be True or False, not 'yes'"),
    (dict(variant="B/4", image_size=64, adaln="False"), "adaln must be True or False, not 'False'"),
    (dict(variant="B/4", image_size=64, scan=1), "scan must be True or False, not 1"),
    (dict(variant="B/4", image_size=64, decoder_queries="noise"), "unknown decoder_queries"),
    (dict(variant="B/4", image_size=64, decoder_attention="self"),
     "unknown decoder_attention 'self'; known: joint, cross_self, cross"),
    (dict(variant="B/4", image_size=64, adaln=False, decoder_attention="cross"),
     r"decoder_attention='cross' is DiffMAE's: .* \(decoder_queries='noised_patches'\)"),
    (dict(variant="B/4", image_size=64, decoder_queries="noised_patches",
          decoder_attention="cross_self"), r"with additive conditioning \(adaln=False\)"),
    (dict(variant="B/4", image_size=64, colour=True), r"unknown model option\(s\) colour"),
])
def test_bad_model_config(cfg, match):
  with pytest.raises(ConfigError, match=match):
    ae.build_model(cfg)


def test_block_masking_in_model():
  model = ae.build_model(dict(variant="Mu/2", image_size=16, masking="block", mask_block_size=4))
  x = _images(b=2)
  variables = model.init(RNGS, x, jnp.zeros(2, jnp.int32), mask_ratio=0.75)
  out = model.apply(variables, x, jnp.zeros(2, jnp.int32), mask_ratio=0.75, rngs=RNGS)
  np.testing.assert_array_equal(out["mask"].sum(1), 48)  # 3 of 4 blocks of 16 patches.


@pytest.mark.parametrize("posemb", ["sincos2d", "learn"])
def test_position_embeddings_tell_patches_apart(posemb, monkeypatch):
  """Attention is equivariant to permuting tokens: without position embeddings, rolling
  the input's patches only rolls the output's. With them (encoder and decoder) it does
  not. The first half checks the premise, so that the second cannot pass by accident."""
  model = ae.build_model(dict(variant="Mu/4", image_size=16, posemb=posemb))
  x, t = _images(b=2), jnp.array([0, 300])
  params = _perturbed(model.init(RNGS, x, t, mask_ratio=0.0)["params"])
  roll = lambda images: jnp.roll(images, 4, axis=2)  # One patch along the width.

  def rolled_gap(params):
    out = lambda images: model.apply({"params": params}, images, t, mask_ratio=0.0)["x0"]
    return float(jnp.abs(out(roll(x)) - roll(out(x))).max())

  if posemb == "learn":
    no_posemb = {k: (jnp.zeros_like(v) if k.endswith("pos_embedding") else v)
                 for k, v in params.items()}
  else:
    monkeypatch.setattr(ae, "posemb_sincos_2d", lambda h, w, width: jnp.zeros((1, h * w, width)))
    no_posemb = params
  assert rolled_gap(no_posemb) < 1e-5
  monkeypatch.undo()
  assert rolled_gap(params) > 1e-2
