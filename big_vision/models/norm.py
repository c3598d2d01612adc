"""The model's LayerNorms, with a hand-written backward pass: LayerNorm(x) * (1 + scale) + shift.

With AdaLN (DiT's AdaLN-Zero) the condition gives shift and scale (NormModulate); a plain
LayerNorm has them as parameters (LayerNorm, flax's parameters). JAX's autodiff of flax's
LayerNorm keeps two float32 arrays of x's size for the backward pass (the centred and
the normalised x). The backward pass here keeps x itself (in its own dtype: half the bytes
in a bfloat16 stream) and two numbers per token (mean, 1/std), and recomputes the
normalised x where it reads it: less memory and memory traffic (UMD-S/4's step on a
2-core CPU: 4% faster, 8% less memory; docs/BENCHMARKS.md), the same values to float32
rounding (tests/test_norm.py). With kernels="pallas" the backward pass of [B, T, D]
tokens is one Pallas kernel (fused_backward.py).
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision.models import fused_backward

EPSILON = 1e-6  # flax.linen.LayerNorm's default.


def _sum_to_shape(t, shape):
  """Sums t over the axes that broadcasting t's shape from `shape` added or stretched."""
  t = t.sum(tuple(range(t.ndim - len(shape)))) if t.ndim > len(shape) else t
  axes = tuple(i for i, (n, m) in enumerate(zip(t.shape, shape)) if m == 1 and n != 1)
  return t.sum(axes, keepdims=True) if axes else t


def _statistics(x32, epsilon):
  mean = x32.mean(-1, keepdims=True)
  # E[x^2] - E[x]^2, as flax's LayerNorm (use_fast_variance): one pass over x.
  variance = jnp.maximum((x32 * x32).mean(-1, keepdims=True) - mean * mean, 0.0)
  return mean, jax.lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_modulate(x, shift, scale, epsilon=EPSILON, kernels="xla"):
  """LayerNorm over the last axis of x, then * (1 + scale) + shift.

  Args:
    x: [..., D] (e.g. tokens [B, N, D]); statistics in float32 whatever its dtype.
    shift, scale: broadcastable to x (AdaLN: [B, 1, D]).
    epsilon: added to the variance.
    kernels: the backward pass's, fused_backward.KERNELS ("xla": XLA's fusions; the Pallas
      kernel takes x [B, T, D] with shift and scale per image or shared, else "xla"'s).
  Returns:
    x's shape, in the dtype that x, shift and scale promote to.
  """
  return _forward(x, shift, scale, epsilon)[0]


def _forward(x, shift, scale, epsilon, kernels="xla"):
  del kernels  # Of the backward pass.
  x32 = x.astype(jnp.float32)
  mean, inv_std = _statistics(x32, epsilon)
  y = (x32 - mean) * inv_std * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
  return y.astype(jnp.result_type(x, shift, scale)), (x, mean, inv_std, shift, scale)


def _backward(epsilon, kernels, residuals, dy, dx_residual=None):
  """The gradients of x, shift and scale; dx_residual: x's gradient from elsewhere, added."""
  del epsilon  # In inv_std already.
  x, mean, inv_std, shift, scale = residuals
  if fused_backward.uses_pallas(kernels) and fused_backward.takes(x.shape, shift.shape,
                                                                   scale.shape):
    per_image = jnp.broadcast_to(scale, (x.shape[0], 1, x.shape[2]))[:, 0]
    dx, dshift, dscale = fused_backward.layer_norm_modulate_backward(
        x, mean, inv_std, per_image, dy, kernels, dx_residual)
    return (dx, _sum_to_shape(dshift[:, None], shift.shape).astype(shift.dtype),
            _sum_to_shape(dscale[:, None], scale.shape).astype(scale.dtype))
  dy = dy.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * inv_std
  dx_hat = dy * (1 + scale.astype(jnp.float32))
  # d/dx of (x - mean) * inv_std: the normalised gradient, less its mean and its
  # projection on x_hat (both over the last axis).
  dx = inv_std * (dx_hat - dx_hat.mean(-1, keepdims=True)
                  - x_hat * (dx_hat * x_hat).mean(-1, keepdims=True))
  if dx_residual is not None:
    dx += dx_residual.astype(jnp.float32)
  return (dx.astype(x.dtype), _sum_to_shape(dy, shift.shape).astype(shift.dtype),
          _sum_to_shape(dy * x_hat, scale.shape).astype(scale.dtype))


layer_norm_modulate.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_modulate_and_x(x, shift, scale, epsilon=EPSILON, kernels="xla"):
  """(layer_norm_modulate(x, shift, scale), x): x passed through, for a residual branch
  x + f(norm(x)) to add to. The backward pass gets both of x's gradients and adds them
  where it computes the norm's: in the Pallas kernel, in the same pass."""
  return _forward(x, shift, scale, epsilon)[0], x


def _forward_and_x(x, shift, scale, epsilon, kernels):
  y, residuals = _forward(x, shift, scale, epsilon, kernels)
  return (y, x), residuals


def _backward_and_x(epsilon, kernels, residuals, cotangents):
  dy, dx_residual = cotangents
  return _backward(epsilon, kernels, residuals, dy, dx_residual)


layer_norm_modulate_and_x.defvjp(_forward_and_x, _backward_and_x)


def layer_norm_modulate_autodiff(x, shift, scale, epsilon=EPSILON):
  """layer_norm_modulate's function with JAX's autodiff for its backward pass (the model
  option autodiff_backward, kept to compare)."""
  return _forward(x, shift, scale, epsilon)[0]


def _layer_norm_modulate(autodiff, kernels, and_x):
  """The function (x, shift, scale) -> y, or -> (y, x) with and_x."""
  if autodiff:
    fn = layer_norm_modulate_autodiff
    return (lambda *a: (fn(*a), a[0])) if and_x else fn
  if and_x:
    return lambda x, shift, scale: layer_norm_modulate_and_x(x, shift, scale, EPSILON, kernels)
  if fused_backward.uses_pallas(kernels):
    return lambda x, shift, scale: layer_norm_modulate(x, shift, scale, EPSILON, kernels)
  return layer_norm_modulate


class NormModulate(nn.Module):
  """AdaLN: LayerNorm without parameters, then the condition's shift and scale.

  A module only to name its ops (norm1, norm2) in profiles.
  """
  autodiff: bool = False  # JAX's autodiff for the backward pass (to compare).
  kernels: str = "xla"  # The backward pass's: fused_backward.KERNELS.
  and_x: bool = False  # Return (y, x), x for the residual (layer_norm_modulate_and_x).

  @nn.compact
  def __call__(self, x, shift, scale):
    return _layer_norm_modulate(self.autodiff, self.kernels, self.and_x)(x, shift, scale)


class LayerNorm(nn.Module):
  """flax.linen.LayerNorm (its parameters, `scale` and `bias`), with this backward pass."""
  dtype: Optional[Any] = None  # Of the output; None: x's and the parameters' promoted.
  autodiff: bool = False  # JAX's autodiff for the backward pass (to compare).
  kernels: str = "xla"  # The backward pass's: fused_backward.KERNELS.
  and_x: bool = False  # Return (y, x), x for the residual (layer_norm_modulate_and_x).

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    out = _layer_norm_modulate(self.autodiff, self.kernels, self.and_x)(x, bias, scale - 1)
    if self.dtype is None:
      return out
    return (out[0].astype(self.dtype), out[1]) if self.and_x else out.astype(self.dtype)
