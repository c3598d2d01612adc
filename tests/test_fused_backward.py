"""The Pallas kernels of fused_backward.py against norm.py's backward and plain autodiff:
in Pallas's interpreter on any device, lowered to Triton for a GPU without one, and
compiled on a GPU where there is one."""
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision.config_parsing import ConfigError
from big_vision.models import ae
from big_vision.models import fused_backward
from big_vision.models import norm
from tests import processes
from tests import test_models
from tests import test_norm

ON_GPU = jax.devices()[0].platform == "gpu"


def _tokens(shape, dtype, seed):
  return (2 * jax.random.normal(jax.random.PRNGKey(seed), shape) + 0.5).astype(dtype)


# Token counts and widths that are not powers of two or multiples of a segment: the
# kernels pad the features and mask the last chunk and segment. UMD-B/4's widths (768,
# 384) loop over several chunks of rows a segment, and over several segments.
SHAPES = [(3, 17, 64), (2, 41, 192), (2, 68, 768), (1, 100, 384)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_modulate_kernel_matches_norm_backward(shape, dtype, with_residual):
  b, t, d = shape
  x, dy = _tokens(shape, dtype, 0), _tokens(shape, dtype, 1)
  dx_residual = _tokens(shape, dtype, 3) if with_residual else None
  scale = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (b, d))
  mean, inv_std = norm._statistics(x.astype(jnp.float32), norm.EPSILON)
  dx, dshift, dscale = fused_backward.layer_norm_modulate_backward(
      x, mean, inv_std, scale, dy, "pallas_interpret", dx_residual)
  # norm.py's backward with XLA's fusions, per-image shift and scale.
  want_dx, want_dshift, want_dscale = norm._backward(
      norm.EPSILON, "xla", (x, mean, inv_std, scale[:, None], scale[:, None]), dy,
      dx_residual)
  assert dx.dtype == dtype and dshift.dtype == dscale.dtype == jnp.float32
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.float32(dx), np.float32(want_dx), **tol)
  np.testing.assert_allclose(dshift, want_dshift[:, 0], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dscale, want_dscale[:, 0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
# The residual stream's dtype, then the gate's and y's (the matmuls').
@pytest.mark.parametrize("x_dtype,dtype", [(jnp.float32, jnp.float32),
                                           (jnp.bfloat16, jnp.bfloat16),
                                           (jnp.float32, jnp.bfloat16)])
def test_gate_kernel_matches_autodiff(shape, x_dtype, dtype):
  b, _, d = shape
  x = _tokens(shape, x_dtype, 0)
  y, dout = _tokens(shape, dtype, 1), _tokens(shape, jnp.result_type(x_dtype, dtype), 2)
  gate = jax.random.normal(jax.random.PRNGKey(3), (b, 1, d)).astype(dtype)
  got = jax.vjp(lambda *a: fused_backward.gated_residual(*a, "pallas_interpret"),
                x, gate, y)[1](dout)
  # Autodiff in float32 (in bfloat16 it sums d_gate in bfloat16; the kernel in float32).
  f32 = lambda a: a.astype(jnp.float32)
  want = jax.vjp(lambda *a: a[0] + a[1] * a[2], f32(x), f32(gate), f32(y))[1](f32(dout))
  tol = dict(rtol=1e-5, atol=1e-4) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  for name, w, g, a in zip(("x", "gate", "y"), want, got, (x, gate, y)):
    assert g.shape == a.shape and g.dtype == a.dtype, name
    np.testing.assert_allclose(f32(g), w, err_msg=name, **tol)


def test_gate_of_another_shape_takes_autodiff(monkeypatch):
  """A gate shared by the images ([1, 1, D]) is not the kernel's [B, 1, D]: autodiff."""
  monkeypatch.setattr(fused_backward, "gated_residual_backward", None)  # Never called.
  x, y, dout = (_tokens((2, 5, 8), jnp.float32, seed) for seed in (0, 1, 2))
  gate = jnp.full((1, 1, 8), 0.5)
  want = jax.vjp(lambda *a: a[0] + a[1] * a[2], x, gate, y)[1](dout)
  got = jax.vjp(lambda *a: fused_backward.gated_residual(*a, "pallas_interpret"),
                x, gate, y)[1](dout)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)


def test_takes_tokens_with_per_image_or_shared_parameters():
  assert fused_backward.takes((4, 7, 16), (4, 1, 16), (16,), (1, 1, 16))
  assert not fused_backward.takes((4, 7, 16), (4, 7, 16))  # Per token.
  assert not fused_backward.takes((4, 16), (16,))  # Not tokens.
  assert not fused_backward.takes((2**16, 2**8, 2**7))  # 2^31 elements: 32-bit offsets.


# AdaLN's per-image shift and scale, the plain LayerNorm's shared ones (summed over the
# images after the kernel), and per-token ones, which the kernel does not take (XLA's).
@pytest.mark.parametrize("shift_shape", [(3, 1, 16), (16,), (3, 7, 16)])
def test_layer_norm_modulate_with_kernels_has_xlas_gradients(shift_shape):
  x, shift, scale, weights = test_norm._inputs(shift_shape)
  fn = lambda kernels: lambda *a: norm.layer_norm_modulate(*a, norm.EPSILON, kernels)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * weights)
  want, got = (jax.grad(loss(fn(k)), argnums=(0, 1, 2))(x, shift, scale)
               for k in ("xla", "pallas_interpret"))
  for name, w, g in zip(("x", "shift", "scale"), want, got):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kernels", ["xla", "pallas_interpret"])
def test_layer_norm_modulate_and_x_adds_both_gradients_of_x(kernels):
  """x + sin(norm(x)) through layer_norm_modulate_and_x: the gradients of autodiff."""
  x, shift, scale, weights = test_norm._inputs((3, 1, 16))
  def loss(x, shift, scale):
    y, x_again = norm.layer_norm_modulate_and_x(x, shift, scale, norm.EPSILON, kernels)
    return jnp.sum((x_again + jnp.sin(y)) * weights)
  reference = lambda x, shift, scale: jnp.sum(
      (x + jnp.sin(test_norm._reference(x, shift, scale))) * weights)
  want, got = (jax.grad(f, argnums=(0, 1, 2))(x, shift, scale) for f in (reference, loss))
  for name, w, g in zip(("x", "shift", "scale"), want, got):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kw,small_chunks", [
    # Chunks of 4 rows, segments of up to 8 tokens: several of each, as at B/4's widths.
    (dict(adaln=True), True),
    (dict(adaln=True, scan=True, remat_policy="nothing_saveable"), False),
    # The plain LayerNorms (parameters shared over the images) and DiffMAE's decoder:
    # self- and cross-attention, each with its norm and residual.
    (dict(adaln=False, decoder_queries="noised_patches", decoder_attention="cross_self"),
     False),
])
def test_model_with_pallas_kernels_has_the_same_loss_and_gradients(kw, small_chunks,
                                                                   monkeypatch):
  """backward_kernels="pallas_interpret": the model's loss and every parameter's
  gradient are those of the default backward passes, to float32 rounding."""
  if small_chunks:
    monkeypatch.setattr(fused_backward, "_CHUNK_ELEMENTS", 256)
    monkeypatch.setattr(fused_backward, "SEGMENT_ROWS", 8)
  kw = dict(variant="Mu/4", image_size=16, decoder_depth=1, **kw)
  models = [ae.build_model(dict(kw, backward_kernels=k)) for k in ("xla", "pallas_interpret")]
  x, t = test_models._images(), jnp.array([0, 10, 999])
  params = test_models._perturbed(models[0].init(test_models.RNGS, x, t)["params"])
  (l1, g1), (l2, g2) = (jax.jit(lambda p, m=m: test_models._masked_loss_and_grads(m, p, x, t))(
      params) for m in models)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                         g1, g2)


@pytest.mark.parametrize("width,tokens", [(768, 68), (768, 164), (384, 260)])
def test_kernels_lower_to_triton_for_a_gpu(width, tokens):
  """UMD-B/4's shapes at 64x64 (encoder rows with 25% and 62.5% of the patches, decoder)
  lower to one Triton kernel each for a GPU, on this machine: a smoke test of Pallas's
  lowering (power-of-two blocks, the ops Triton supports). Compiling to PTX, registers
  and speed need the GPU."""
  x = jax.ShapeDtypeStruct((128, tokens, width), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((128, tokens, 1), jnp.float32)
  per_image = jax.ShapeDtypeStruct((128, width), jnp.bfloat16)
  norm_backward = fused_backward.layer_norm_modulate_backward
  for fn, args in (
      (lambda *a: norm_backward(*a, "pallas"), (x, stats, stats, per_image, x)),
      (lambda *a: norm_backward(*a[:5], "pallas", a[5]), (x, stats, stats, per_image, x, x)),
      (lambda *a: fused_backward.gated_residual_backward(*a, "pallas"), (x, x, per_image))):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("kw,match", [
    (dict(backward_kernels="cuda"), "unknown backward_kernels 'cuda'; known: xla, pallas"),
    (dict(backward_kernels="pallas_interpret", autodiff_backward=True), "set one of them"),
])
def test_bad_backward_kernels(kw, match):
  with pytest.raises(ConfigError, match=match):
    ae.build_model(dict(variant="Mu/4", image_size=16, **kw))


@pytest.mark.skipif(ON_GPU, reason="this process runs on a GPU")
def test_pallas_off_gpu_is_a_clear_error():
  with pytest.raises(ConfigError, match="compiles Triton kernels for an NVIDIA GPU"):
    ae.build_model(dict(variant="Mu/4", image_size=16, backward_kernels="pallas"))


def test_kernels_split_over_devices_by_the_images():
  """On 4 devices, the batch split over them, with replicated and fully sharded (FSDP)
  parameters: the kernels' gradients are the default path's, with the same communication
  (the parameters' gradients summed), so each device ran the kernels on its own images.
  Without the partitioning XLA would gather the tokens; in Pallas's interpreter it
  all-reduces them (23 all-reduces against 1, replicated)."""
  code = textwrap.dedent("""
      import json
      import jax, jax.numpy as jnp, numpy as np
      from big_vision import sharding
      from big_vision.models import ae
      from tests import test_models
      mesh = sharding.make_mesh()
      batch = sharding.batch_sharding(mesh)
      x = jax.device_put(test_models._images(b=8), batch)
      t = jax.device_put(jnp.array([0, 10, 999, 5, 1, 300, 20, 7]), batch)
      ops = []
      for strategy in ("replicated", "fully_sharded"):
        results = {}
        for kernels in ("xla", "pallas_interpret"):
          model = ae.build_model(dict(variant="Mu/4", image_size=16, decoder_depth=1,
                                      backward_kernels=kernels))
          params = test_models._perturbed(model.init(test_models.RNGS, x, t)["params"])
          params = jax.device_put(params, sharding.tree_shardings(
              jax.eval_shape(lambda: params), mesh, strategy))
          step = jax.jit(lambda p, x, t: test_models._masked_loss_and_grads(model, p, x, t))
          hlo = step.lower(params, x, t).compile().as_text()
          results[kernels] = step(params, x, t), {
              op: hlo.count(op + "(") for op in ("all-gather", "all-reduce", "all-to-all")}
        (l1, g1), ops1 = results["xla"]
        (l2, g2), ops2 = results["pallas_interpret"]
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g2)
        ops.append([ops1, ops2])
      print("RESULT" + json.dumps(ops))
  """)
  out, = processes.run_all([["-c", code]], timeout=600,
                           env=dict(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  line = [l for l in out.splitlines() if l.startswith("RESULT")]
  assert line, out[-3000:]
  for xla_ops, kernel_ops in json.loads(line[0][len("RESULT"):]):
    assert xla_ops["all-reduce"] > 0 and kernel_ops == xla_ops, (xla_ops, kernel_ops)


@pytest.mark.skipif(not ON_GPU, reason="the compiled Triton kernels need an NVIDIA GPU")
def test_pallas_kernels_match_xla_on_gpu():
  """Compiled by Triton: the same loss and gradients as XLA's fusions, in bfloat16."""
  kw = dict(variant="Mu/4", image_size=16, dtype_mm="bfloat16", dtype_activations="bfloat16")
  models = [ae.build_model(dict(kw, backward_kernels=k)) for k in ("xla", "pallas")]
  x, t = test_models._images(b=4), jnp.array([0, 10, 500, 999])
  params = test_models._perturbed(models[0].init(test_models.RNGS, x, t)["params"])
  (la, ga), (lb, gb) = (jax.jit(lambda p, m=m: test_models._masked_loss_and_grads(m, p, x, t))(
      params) for m in models)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    assert np.linalg.norm(np.float32(a - b)) <= 0.02 * np.linalg.norm(np.float32(a)) + 1e-6
