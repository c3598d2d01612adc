"""Pallas (Triton) kernels for two backward passes of the AdaLN block, each in one pass.

On a GPU the elementwise work around the matmuls takes a third of UMD-B/4's step, in
about 1,800 small fusions (docs/BENCHMARKS.md, the H200 profile). Two of its parts are
reductions over the tokens that XLA runs as several kernels, writing transposed
products before it reduces them:

- the LayerNorm + modulation's backward (norm.py): dx needs two means over the features
  of each token, d_shift and d_scale sums over the tokens of each image;
- the gated residual x + gate * y (AdaLN-Zero's gate): d_gate is a sum over the tokens
  of dout * y, and dy is dout * gate.

Each kernel here reads its inputs once and writes dx (dy) and its sums over the tokens
in the same pass. The program grid is (images, segments of at most `SEGMENT_ROWS` tokens);
each program loops over its segment in chunks of rows (the features padded to a power of
two, as Triton needs, and masked), and writes its partial sums, which XLA adds up over
the segments. The forward passes stay XLA's. Other shapes (not [B, T, D] tokens with
per-image or shared shift, scale and gate; 2^31 elements or more, past Triton's 32-bit
offsets) take XLA's path.

The model option `backward_kernels` picks them: "xla" (norm.py's backward, XLA's
fusions), "pallas" (these kernels, compiled by Triton: an NVIDIA GPU), or
"pallas_interpret" (the same kernels in Pallas's interpreter, on any device: to test
them; slow). On several devices each device runs the kernels on its own images
(`_per_device`): the sums are per image, so with replicated parameters the batch's split
needs no communication; under FSDP, where XLA splits the tokens' gradients by the
features as it does the parameters, they are re-split by the images around each kernel
(all-to-alls). (`custom_partitioning` has no batching rule: no jax.vmap through them.)
Tested on several devices in the interpreter only; not timed on a GPU yet
(docs/BENCHMARKS.md). JAX 0.11's Pallas deprecates its Triton backend for Mosaic GPU:
these kernels are its first candidates to port once they have shown what a one-pass
backward gains.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as pl_triton

KERNELS = ("xla", "pallas", "pallas_interpret")
SEGMENT_ROWS = 32  # At most this many tokens a program: more programs than images.
# Elements of each array a program holds at once (rows x padded features): 16 float32 a
# thread with 8 warps, so that the half-dozen arrays alive in a chunk fit the registers.
_CHUNK_ELEMENTS = 4096


def uses_pallas(kernels):
  return kernels in ("pallas", "pallas_interpret")


def takes(x_shape, *per_image_shapes):
  """Whether the kernels take tokens x [B, T, D] with these shifts, scales or gates:
  each broadcasting to x as [B, 1, D] does, and under 2^31 elements (32-bit offsets)."""
  if len(x_shape) != 3 or math.prod(x_shape) >= 2**31:
    return False
  b, _, d = x_shape
  try:
    return all(jnp.broadcast_shapes(s, (b, 1, d)) == (b, 1, d) for s in per_image_shapes)
  except ValueError:
    return False


def _per_device(fn, *arrays):
  """fn(*arrays) for arrays and outputs with the images first, partitioned over the
  devices by the images: each device runs fn (its kernels) on its own images, the other
  axes whole. Without it XLA would gather the batch on every device to run a kernel it
  cannot split. On one device, fn itself."""

  def by_images(mesh, arg_shapes):
    # The images over every device where they divide, whatever split the operands
    # arrive in (under FSDP the tokens' gradients come split by the features, as the
    # parameters are); else as arrays[0] splits them.
    first = arg_shapes[0]
    if mesh.empty:  # Shardings without a named mesh: which axis is the images' unknown.
      raise ValueError("the Pallas backward kernels on several devices need the step "
                       "jitted with NamedShardings of a Mesh (as the trainer does); got "
                       f"{type(first.sharding).__name__}")
    spec = first.sharding.spec
    images = (mesh.axis_names if first.shape[0] % mesh.size == 0 else
              spec[0] if len(spec) else None)
    return lambda a: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(images, *[None] * (len(a.shape) - 1)))

  def infer_sharding_from_operands(mesh, arg_shapes, result_shapes):
    return jax.tree.map(by_images(mesh, arg_shapes), result_shapes)

  def partition(mesh, arg_shapes, result_shapes):
    split = by_images(mesh, arg_shapes)
    return mesh, fn, jax.tree.map(split, result_shapes), jax.tree.map(split, arg_shapes)

  # Shardy's rule: factor b (the images) shared by every array, the other axes their own.
  names = itertools.count()
  axes = lambda a: " ".join(["b"] + [f"f{next(names)}" for _ in a.shape[1:]])
  results = jax.tree.leaves(jax.eval_shape(fn, *arrays))
  rule = (", ".join(axes(a) for a in arrays) + " -> " + ", ".join(axes(r) for r in results))
  partitioned = custom_partitioning(lambda *a: fn(*a))  # Positional arguments only.
  partitioned.def_partition(partition, infer_sharding_from_operands, sharding_rule=rule)
  return partitioned(*arrays)


def _layout(tokens, features):
  """(padded features, rows per chunk, chunks per segment, segments, warps): segments of
  near-equal size, at most SEGMENT_ROWS tokens each."""
  padded = pl.next_power_of_2(features)
  rows = max(1, min(SEGMENT_ROWS, _CHUNK_ELEMENTS // padded))
  chunks = pl.cdiv(pl.cdiv(tokens, pl.cdiv(tokens, SEGMENT_ROWS)), rows)
  warps = max(1, min(8, rows * padded // 512))
  return padded, rows, chunks, pl.cdiv(tokens, chunks * rows), warps


def _call(kernel, out_shape, grid, kernels, num_warps, name):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=kernels == "pallas_interpret",
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps), name=name)


def _program(padded, features):
  """This program's image and segment, the padded features' indices and their mask."""
  columns = jnp.arange(padded)
  return pl.program_id(0), pl.program_id(1), columns, columns < features


def _load(ref, index, mask):
  """A masked load, in float32 (zeros where masked)."""
  return pl_triton.load(ref.at[index], mask=mask, other=0.0).astype(jnp.float32)


def _tile(b, segment, chunk, rows, chunks, tokens, columns, column_mask):
  """A chunk's rows of [B*T, D] arrays: the row indices, their mask, the [rows, padded]
  index and the mask of its real (token, feature) entries."""
  t = (segment * chunks + chunk) * rows + jnp.arange(rows)
  row, row_mask = b * tokens + t, t < tokens
  return row, row_mask, (row[:, None], columns[None, :]), row_mask[:, None] & column_mask


def _layer_norm_modulate_kernel(*refs, tokens, features, rows, chunks, padded,
                                with_residual):
  if with_residual:
    (x_ref, dy_ref, dres_ref, mean_ref, inv_std_ref, scale_ref,
     dx_ref, dshift_ref, dscale_ref) = refs
  else:
    x_ref, dy_ref, mean_ref, inv_std_ref, scale_ref, dx_ref, dshift_ref, dscale_ref = refs
  b, segment, columns, column_mask = _program(padded, features)
  one_plus_scale = 1 + _load(scale_ref, (b, columns), column_mask)

  def chunk_body(chunk, sums):
    row, row_mask, tile, mask = _tile(b, segment, chunk, rows, chunks, tokens, columns,
                                      column_mask)
    x, dy = _load(x_ref, tile, mask), _load(dy_ref, tile, mask)
    mean = _load(mean_ref, row, row_mask)[:, None]
    inv_std = _load(inv_std_ref, row, row_mask)[:, None]
    x_hat = jnp.where(mask, (x - mean) * inv_std, 0.0)
    dx_hat = dy * one_plus_scale[None, :]
    # norm.py's backward: the normalised gradient less its mean and its projection on
    # x_hat, over the (real) features.
    mean_dx_hat = dx_hat.sum(1, keepdims=True) / features
    mean_projection = (dx_hat * x_hat).sum(1, keepdims=True) / features
    dx = inv_std * (dx_hat - mean_dx_hat - x_hat * mean_projection)
    if with_residual:  # x's other gradient, through the residual.
      dx += _load(dres_ref, tile, mask)
    pl_triton.store(dx_ref.at[tile], dx.astype(dx_ref.dtype), mask=mask)
    dshift, dscale = sums
    return dshift + dy.sum(0), dscale + (dy * x_hat).sum(0)

  zeros = jnp.zeros((padded,), jnp.float32)
  dshift, dscale = jax.lax.fori_loop(0, chunks, chunk_body, (zeros, zeros))
  out = b * pl.num_programs(1) + segment
  pl_triton.store(dshift_ref.at[out, columns], dshift, mask=column_mask)
  pl_triton.store(dscale_ref.at[out, columns], dscale, mask=column_mask)


def layer_norm_modulate_backward(x, mean, inv_std, scale, dy, kernels, dx_residual=None):
  """norm.py's backward in one pass: x, dy [B, T, D]; mean, inv_std [B, T, 1] (float32);
  scale [B, D]; dx_residual: x's gradient from elsewhere (the residual), added to dx in
  the same pass. Returns dx [B, T, D] (x's dtype), d_shift and d_scale [B, D] (float32)."""
  residual = () if dx_residual is None else (dx_residual,)
  return _per_device(functools.partial(_layer_norm_modulate_backward_pass, kernels=kernels),
                     x, dy, mean, inv_std, scale.astype(jnp.float32), *residual)


def _layer_norm_modulate_backward_pass(x, dy, mean, inv_std, scale, *residual, kernels):
  b, t, d = x.shape
  padded, rows, chunks, segments, warps = _layout(t, d)
  kernel = functools.partial(_layer_norm_modulate_kernel, tokens=t, features=d, rows=rows,
                             chunks=chunks, padded=padded, with_residual=bool(residual))
  sums = jax.ShapeDtypeStruct((b * segments, d), jnp.float32)
  dx, dshift, dscale = _call(
      kernel, (jax.ShapeDtypeStruct((b * t, d), x.dtype), sums, sums), (b, segments),
      kernels, warps, "layer_norm_modulate_backward")(
          x.reshape(b * t, d), dy.reshape(b * t, d), *(a.reshape(b * t, d) for a in residual),
          mean.reshape(b * t), inv_std.reshape(b * t), scale)
  total = lambda s: s.reshape(b, segments, d).sum(1)
  return dx.reshape(b, t, d), total(dshift), total(dscale)


def _gate_kernel(dout_ref, y_ref, gate_ref, dy_ref, dgate_ref, *, tokens, features, rows,
                 chunks, padded):
  b, segment, columns, column_mask = _program(padded, features)
  gate = _load(gate_ref, (b, columns), column_mask)

  def chunk_body(chunk, dgate):
    _, _, tile, mask = _tile(b, segment, chunk, rows, chunks, tokens, columns, column_mask)
    dout, y = _load(dout_ref, tile, mask), _load(y_ref, tile, mask)
    pl_triton.store(dy_ref.at[tile], (dout * gate[None, :]).astype(dy_ref.dtype), mask=mask)
    return dgate + (dout * y).sum(0)

  dgate = jax.lax.fori_loop(0, chunks, chunk_body, jnp.zeros((padded,), jnp.float32))
  pl_triton.store(dgate_ref.at[b * pl.num_programs(1) + segment, columns], dgate,
                  mask=column_mask)


def gated_residual_backward(dout, y, gate, kernels):
  """The backward pass of x + gate * y with y [B, T, D], gate [B, D], in one pass:
  dy = dout * gate ([B, T, D], y's dtype), d_gate = sum over tokens of dout * y ([B, D],
  float32). (d_x is dout.)"""
  return _per_device(functools.partial(_gated_residual_backward_pass, kernels=kernels),
                     dout, y, gate)


def _gated_residual_backward_pass(dout, y, gate, kernels):
  b, t, d = y.shape
  padded, rows, chunks, segments, warps = _layout(t, d)
  kernel = functools.partial(_gate_kernel, tokens=t, features=d, rows=rows, chunks=chunks,
                             padded=padded)
  dy, dgate = _call(
      kernel, (jax.ShapeDtypeStruct((b * t, d), y.dtype),
               jax.ShapeDtypeStruct((b * segments, d), jnp.float32)),
      (b, segments), kernels, warps, "gated_residual_backward")(
          dout.reshape(b * t, d), y.reshape(b * t, d), gate)
  return dy.reshape(b, t, d), dgate.reshape(b, segments, d).sum(1)


def gated_residual(x, gate, y, kernels):
  """x + gate * y (AdaLN-Zero's gated residual) with the kernels' backward pass, for x, y
  [B, T, D] and gate [B, 1, D]; other shapes with autodiff's."""
  if x.shape != y.shape or not takes(y.shape) or gate.shape != (y.shape[0], 1, y.shape[2]):
    return x + gate * y
  return _gated_residual(x, gate, y, kernels, jnp.dtype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated_residual(x, gate, y, kernels, x_dtype):
  del kernels, x_dtype  # Of the backward pass.
  return x + gate * y


def _gated_residual_forward(x, gate, y, kernels, x_dtype):
  return _gated_residual(x, gate, y, kernels, x_dtype), (gate, y)


def _gated_residual_backward(kernels, x_dtype, residuals, dout):
  gate, y = residuals
  dy, dgate = gated_residual_backward(dout, y, gate[:, 0], kernels)
  return dout.astype(x_dtype), dgate[:, None, :].astype(gate.dtype), dy


_gated_residual.defvjp(_gated_residual_forward, _gated_residual_backward)
