"""The generic masked-diffusion auto-encoder (a ViT encoder/decoder with t conditioning).

One module expresses MAE, UMD, DiT, MaskDiT, MaskDM and DiffMAE; the trainer decides what
goes in (clean or noised images, which mask ratio, which t) and what is scored:

  images [B,H,W,C] --patchify+embed+posemb--> tokens --keep visible--> (+ cls tokens)
  --> encoder blocks --> linear to decoder width --> mask tokens at masked positions
  --> decoder posemb --> decoder blocks --> head: p*p*2C per patch = (x0, eps) images.

Conditioning c = time embedding (+ label embedding) enters every block through AdaLN-Zero
(`adaln=True`, DiT) or is added to the tokens (`adaln=False`).
The decoder queries at masked positions are built in `_masked_queries`: MAE's learned mask
token, or (`decoder_queries="noised_patches"`, DiffMAE) the embedding of each masked patch
of a noised image: then the encoder sees the clean visible patches (condition t = 0), and
only the decoder is conditioned on the noise level t. Its decoder attends jointly to the
visible features and the queries, or (`decoder_attention="cross_self"`, `"cross"`) the
queries alone go through it, cross-attending to the visible features. MaskDM's block
masking is an option here (`masking="block"`, `mask_block_size`), its loss on visible
patches one of the objective's (`noised_x0_loss=False`).
"""
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision.config_parsing import ConfigError
from big_vision.config_parsing import check_int
from big_vision.config_parsing import is_int
from big_vision.models import conditioning
from big_vision.models import fused_backward
from big_vision.models import gelu
from big_vision.models import masking as masking_lib
from big_vision.models import norm

# Sizes from the DiffMAE table (encoder parameter counts are those of a plain ViT
# encoder: Ti 5.7M, S 22M, B 86M, L 304M, H 632M). "Mu" is a micro size for CPU
# smoke runs and tests; it is not from any paper.
# name: (width, depth, mlp_dim, num_heads, decoder_width, decoder_depth)
SIZES = {
    "Mu": (64, 4, 256, 2, 64, 2),
    "Ti": (192, 12, 768, 3, 96, 4),
    "S": (384, 12, 1536, 6, 192, 4),
    "B": (768, 12, 3072, 12, 384, 8),
    "L": (1024, 24, 4096, 16, 512, 8),
    "H": (1280, 32, 5120, 16, 640, 8),
}

# "elementwise": only the GELUs are recomputed in the backward pass (see Block); the others
# are jax.checkpoint_policies for whole blocks.
REMAT_POLICIES = ("none", "elementwise", "nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")
MATMUL_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# xla: einsum, softmax, einsum (any device); cudnn: cuDNN's fused attention (GPU, 16-bit);
# auto: cudnn where it runs, else xla.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def decode_variant(variant):
  """'B/4' -> dict(width=768, depth=12, ..., patch_size=4)."""
  match = re.fullmatch(r"([A-Za-z]+)/(\d+)", str(variant).strip())
  if not match or match.group(1) not in SIZES:
    raise ConfigError(f"unknown variant {variant!r}; expected SIZE/PATCH with SIZE one of "
                      f"{', '.join(SIZES)} and PATCH a positive integer, e.g. 'B/4'")
  size, patch = match.group(1), int(match.group(2))
  if patch <= 0:
    raise ConfigError(f"variant {variant!r}: patch size must be positive")
  width, depth, mlp_dim, heads, dec_width, dec_depth = SIZES[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
              decoder_width=dec_width, decoder_depth=dec_depth, patch_size=patch)


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
  """Fixed 2-D sin-cos position embedding [1, h*w, width] (MAE)."""
  if width % 4:
    raise ConfigError(f"width {width} must be divisible by 4 for the sincos2d posemb")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe[None], jnp.float32)


def patchify(images, p):
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, grid_hw, p, c):
  """[B, N, p*p*C] -> [B, H, W, C]."""
  gh, gw = grid_hw
  b = patches.shape[0]
  x = patches.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, c)


_dense_init = nn.initializers.xavier_uniform()


class TokenDense(nn.Dense):
  """nn.Dense over [..., tokens, features], computed as one [B*N, in] x [in, out] matmul.

  Same parameters and result as nn.Dense. Why: for a 3-D input, XLA:CPU lays out the
  weight gradient's dot (contracting batch and tokens) so that it first copies the output
  gradient or the input into a transposed buffer, once per Dense per step; on the flat
  2-D product it reads both in place. In the S/4 UMD step this left 31 of 148 such copies
  (attention's), and nn.Dense's step took 15% longer on a 2-core CPU (docs/BENCHMARKS.md).
  On accelerators the reshapes are free.
  """

  @nn.compact
  def __call__(self, inputs):
    leading = inputs.shape[:-1]
    flat = super().__call__(inputs.reshape((-1, inputs.shape[-1])))
    return flat.reshape(leading + flat.shape[-1:])


def cudnn_attention_available():
  """cuDNN's fused attention runs on NVIDIA GPUs from Ampere (compute capability 8.0) on."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  return device.platform == "gpu" and capability is not None and float(capability) >= 8.0


def attention_implementation(attention, dtype):
  """'xla' or 'cudnn' for jax.nn.dot_product_attention, from the model's `attention`.

  'auto' takes cuDNN's fused (flash) attention where it runs, on a recent NVIDIA GPU with
  16-bit matmuls, and XLA's einsum-softmax-einsum everywhere else.
  """
  sixteen_bit = dtype in (jnp.bfloat16, jnp.float16)
  if attention == "auto":
    return "cudnn" if sixteen_bit and cudnn_attention_available() else "xla"
  if attention == "cudnn":
    if not cudnn_attention_available():
      raise ConfigError(f"attention='cudnn' needs an NVIDIA GPU of compute capability 8.0 "
                        f"or newer; this process runs on {jax.devices()[0].device_kind} "
                        "(use attention='auto' or 'xla')")
    if not sixteen_bit:
      raise ConfigError("attention='cudnn' needs 16-bit matmuls (dtype_mm='bfloat16')")
  return attention


def attention_core(q, k, v, implementation, autodiff=False):
  """jax.nn.dot_product_attention ([B, T, heads, head_dim] each), whose softmax keeps only
  its output for the backward pass.

  JAX's default softmax derivative (until it flips `jax_softmax_custom_jvp`) also keeps
  the exponentials: one more float32 [B, heads, T, S] array per attention layer with XLA's
  attention (float32 matmuls). With the custom JVP: the same values and gradients to
  float rounding, UMD-S/4's step on a 2-core CPU 2–3.5% faster with 5% less memory
  (docs/BENCHMARKS.md). cuDNN's attention has its own backward pass. autodiff: JAX's
  default derivative (the model option autodiff_backward, kept to compare).
  """
  with jax.softmax_custom_jvp(not autodiff):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def dense_module(flat_dense):
  """TokenDense (one flat matmul), or nn.Dense as written (a 3-D dot) for comparison."""
  return TokenDense if flat_dense else nn.Dense


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "xla"  # See ATTENTION_IMPLEMENTATIONS.
  flat_dense: bool = True
  autodiff_backward: bool = False  # See Model.

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    if d % self.num_heads:
      raise ConfigError(f"width {d} is not divisible by num_heads {self.num_heads}")
    dense = dense_module(self.flat_dense)
    qkv = dense(3 * d, kernel_init=_dense_init, dtype=self.dtype, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 3, axis=2)
    out = attention_core(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                         attention_implementation(self.attention, self.dtype),
                         self.autodiff_backward)
    return dense(d, kernel_init=_dense_init, dtype=self.dtype, name="proj")(
        out.reshape(b, n, d))


class CrossAttention(nn.Module):
  """Queries x [B, N, D] attend to context [B, M, D] (DiffMAE's cross decoders)."""
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "xla"
  flat_dense: bool = True
  autodiff_backward: bool = False

  @nn.compact
  def __call__(self, x, context):
    (b, n, d), m = x.shape, context.shape[1]
    heads = lambda y, length: y.reshape(b, length, self.num_heads, d // self.num_heads)
    dense = dense_module(self.flat_dense)
    q = dense(d, kernel_init=_dense_init, dtype=self.dtype, name="q")(x)
    kv = dense(2 * d, kernel_init=_dense_init, dtype=self.dtype, name="kv")(context)
    k, v = jnp.split(kv, 2, axis=-1)
    out = attention_core(heads(q, n), heads(k, m), heads(v, m),
                         attention_implementation(self.attention, self.dtype),
                         self.autodiff_backward)
    return dense(d, kernel_init=_dense_init, dtype=self.dtype, name="proj")(
        out.reshape(b, n, d))


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32
  flat_dense: bool = True
  # GELU's backward pass keeps only fc1's output (gelu.py). fc2's keeps its input, the
  # GELU's output, unless recompute_gelu: then it recomputes it from fc1's output.
  recompute_gelu: bool = False
  autodiff_backward: bool = False

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = dense_module(self.flat_dense)
    act = gelu.gelu_autodiff if self.autodiff_backward else gelu.gelu
    x = dense(self.mlp_dim, kernel_init=_dense_init, dtype=self.dtype, name="fc1")(x)
    fc2 = dense(d, kernel_init=_dense_init, dtype=self.dtype, name="fc2")
    if self.recompute_gelu:  # fc2's matmul is not recomputed: its backward needs no output.
      return nn.checkpoint(lambda module, h: module(act(h)))(fc2, x)
    return fc2(act(x))


class Block(nn.Module):
  """Pre-LN transformer block; with `adaln`, DiT's AdaLN-Zero modulation by `cond`.

  The LayerNorms keep only their input and per-token statistics for the backward pass
  (norm.py), the GELU only its input (gelu.py). `recompute_elementwise`
  (remat_policy="elementwise"): the backward pass also recomputes the GELU's output
  (fc2's input) from fc1's output rather than keep it.
  Whole-block remat saves more and recomputes the matmuls too.

  `layout` (DiffMAE's decoders): "self" attention over the tokens; "cross_self", self-
  then cross-attention to `context`; "cross", cross-attention alone. The cross layouts
  take additive conditioning only (adaln=False).
  """
  mlp_dim: int
  num_heads: int
  adaln: bool = True
  dtype: Any = jnp.float32  # Of the matmuls.
  attention: str = "xla"
  act_dtype: Any = jnp.float32  # Of the residual stream and the norms' outputs.
  flat_dense: bool = True
  recompute_elementwise: bool = False
  layout: str = "self"
  autodiff_backward: bool = False  # See Model.
  backward_kernels: str = "xla"  # See Model.

  @nn.compact
  def __call__(self, x, cond, context=None):
    d = x.shape[-1]
    autodiff, kernels = self.autodiff_backward, self.backward_kernels
    attn = Attention(self.num_heads, self.dtype, self.attention, self.flat_dense, autodiff,
                     name="attn")
    mlp = Mlp(self.mlp_dim, self.dtype, self.flat_dense, self.recompute_elementwise,
              autodiff, name="mlp")
    # With the Pallas kernels x reaches each residual add through its norm, whose backward
    # pass then adds x's two gradients in its one pass (norm.layer_norm_modulate_and_x).
    fused = fused_backward.uses_pallas(kernels)
    layer_norm = lambda name: norm.LayerNorm(self.act_dtype, autodiff, kernels, fused,
                                             name=name)
    norm_modulate = lambda name: norm.NormModulate(autodiff, kernels, fused, name=name)

    def residual(x, normed, branch, gate=None):
      """x + branch(normed x), or x + gate * branch(normed x) (AdaLN-Zero)."""
      h, x = normed if fused else (normed, x)
      y = branch(h)
      if gate is None:
        return x + y
      return fused_backward.gated_residual(x, gate, y, kernels) if fused else x + gate * y

    if self.layout != "self":  # Additive conditioning only (checked by _resolve).
      if self.layout == "cross_self":
        x = residual(x, layer_norm("norm1")(x), attn)
      cross = CrossAttention(self.num_heads, self.dtype, self.attention, self.flat_dense,
                             autodiff, name="cross_attn")
      x = residual(x, layer_norm("cross_norm")(x), lambda h: cross(h, context))
      x = residual(x, layer_norm("norm2")(x), mlp)
    elif self.adaln:
      mod = nn.Dense(6 * d, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                     name="adaln_modulation")(nn.silu(cond))
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod[:, None, :], 6, axis=-1)
      x = residual(x, norm_modulate("norm1")(x, shift1, scale1), attn, gate1)
      x = residual(x, norm_modulate("norm2")(x, shift2, scale2), mlp, gate2)
    else:
      x = residual(x, layer_norm("norm1")(x), attn)
      x = residual(x, layer_norm("norm2")(x), mlp)
    return x.astype(self.act_dtype), None


class Stack(nn.Module):
  """`depth` Blocks, unrolled or under nn.scan, optionally rematerialised."""
  depth: int
  mlp_dim: int
  num_heads: int
  adaln: bool = True
  scan: bool = False
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  attention: str = "xla"
  act_dtype: Any = jnp.float32
  flat_dense: bool = True
  layout: str = "self"  # See Block.
  autodiff_backward: bool = False  # See Model.
  backward_kernels: str = "xla"  # See Model.

  @nn.compact
  def __call__(self, x, cond, context=None):
    x = x.astype(self.act_dtype)
    block = Block
    if self.remat_policy not in ("none", "elementwise"):
      policy = getattr(jax.checkpoint_policies, self.remat_policy)
      block = nn.remat(Block, policy=policy, prevent_cse=not self.scan)
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, adaln=self.adaln,
              dtype=self.dtype, attention=self.attention, act_dtype=self.act_dtype,
              flat_dense=self.flat_dense,
              recompute_elementwise=self.remat_policy == "elementwise", layout=self.layout,
              autodiff_backward=self.autodiff_backward,
              backward_kernels=self.backward_kernels)
    if self.scan:
      scanned = nn.scan(block, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=self.depth)
      x, _ = scanned(**kw, name="blocks")(x, cond, context)
    else:
      for i in range(self.depth):
        x, _ = block(**kw, name=f"block_{i:02d}")(x, cond, context)
    return x


class Model(nn.Module):
  """Masked-diffusion auto-encoder. See the module docstring."""
  image_size: Sequence[int]
  channels: int = 3
  patch_size: int = 4
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  decoder_width: int = 384
  decoder_depth: int = 8
  decoder_mlp_dim: Optional[int] = None  # Default 4 x decoder_width.
  num_cls_tokens: int = 4
  adaln: bool = True
  num_classes: int = 0  # 0: unconditional. Otherwise the null class is num_classes.
  # No label dropout here: the objective drops labels (objective.drop_labels, config's
  # label_dropout), per example key.
  posemb: str = "sincos2d"  # or "learn"
  masking: str = "random"  # or "block" (blocks of mask_block_size^2 patches)
  mask_block_size: int = 4
  scan: bool = False
  remat_policy: str = "none"
  dtype_mm: str = "float32"
  # The residual stream between blocks: float32 keeps it exact whatever dtype_mm is;
  # bfloat16 halves the memory traffic of the elementwise work around the matmuls.
  dtype_activations: str = "float32"
  attention: str = "xla"  # See ATTENTION_IMPLEMENTATIONS.
  # Token Dense layers as one [B*N, in] matmul (TokenDense); False: nn.Dense's 3-D dot,
  # the same function, slower on XLA:CPU (kept to compare, see TokenDense).
  flat_dense: bool = True
  decoder_queries: str = "mask_token"  # or "noised_patches" (DiffMAE), see the docstring.
  # DiffMAE's decoders: "joint" self-attention over the visible features and the queries;
  # "cross_self" / "cross": the queries alone, attending to the visible features (see
  # Block), which predict the masked patches only.
  decoder_attention: str = "joint"
  # JAX's autodiff for the backward passes of GELU, the LayerNorms and the softmax, in
  # place of gelu.py's, norm.py's and attention_core's: the same function, more memory
  # and memory traffic (kept to compare, as flat_dense).
  autodiff_backward: bool = False
  # The backward passes of the LayerNorms (+ AdaLN's modulation) and of AdaLN's gated
  # residuals, on [B, T, D] tokens: "xla" (XLA's fusions), "pallas" (a Pallas kernel each,
  # one pass; NVIDIA GPUs, each on its images), "pallas_interpret" (those kernels in Pallas's
  # interpreter, any device: to test them). See fused_backward.py.
  backward_kernels: str = "xla"

  @property
  def grid(self):
    return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

  @property
  def num_patches(self):
    return self.grid[0] * self.grid[1]

  @property
  def noised_queries(self):
    """DiffMAE: the decoder denoises noised masked patches given clean visible ones."""
    return self.decoder_queries == "noised_patches"

  @property
  def block_mask_size(self):
    """The side of the blocks of patches masked whole (masking="block"), else None."""
    return self.mask_block_size if self.masking == "block" else None

  def setup(self):
    dtype = MATMUL_DTYPES[self.dtype_mm]
    stack = dict(adaln=self.adaln, scan=self.scan, remat_policy=self.remat_policy, dtype=dtype,
                 attention=self.attention, act_dtype=MATMUL_DTYPES[self.dtype_activations],
                 flat_dense=self.flat_dense, autodiff_backward=self.autodiff_backward,
                 backward_kernels=self.backward_kernels)
    layer_norm = lambda: norm.LayerNorm(autodiff=self.autodiff_backward,
                                        kernels=self.backward_kernels)
    dense = dense_module(self.flat_dense)
    self.patch_embedding = dense(self.width, kernel_init=_dense_init, dtype=dtype)
    if self.posemb == "learn":
      self.pos_embedding = self.param("pos_embedding", nn.initializers.normal(0.02),
                                      (1, self.num_patches, self.width))
      self.decoder_pos_embedding = self.param(
          "decoder_pos_embedding", nn.initializers.normal(0.02),
          (1, self.num_patches, self.decoder_width))
    else:
      self.pos_embedding = posemb_sincos_2d(*self.grid, self.width)
      self.decoder_pos_embedding = posemb_sincos_2d(*self.grid, self.decoder_width)
    self.cls = self.param("cls", nn.initializers.normal(0.02),
                          (1, self.num_cls_tokens, self.width))
    self.t_embedder = conditioning.TimestepEmbedder(self.width)
    if self.num_classes:
      self.y_embedder = conditioning.LabelEmbedder(self.num_classes, self.width)
    self.encoder = Stack(self.depth, self.mlp_dim, self.num_heads, **stack)
    self.encoder_norm = layer_norm()
    self.decoder_embed = dense(self.decoder_width, kernel_init=_dense_init, dtype=dtype)
    if self.noised_queries:
      self.query_embedding = dense(self.decoder_width, kernel_init=_dense_init, dtype=dtype)
    else:
      self.mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                                   (1, 1, self.decoder_width))
    if not self.adaln:
      self.decoder_cond = nn.Dense(self.decoder_width, kernel_init=_dense_init)
      self.decoder_norm = layer_norm()
    layout = "self" if self.decoder_attention == "joint" else self.decoder_attention
    self.decoder = Stack(self.decoder_depth, self.decoder_mlp_dim or 4 * self.decoder_width,
                         self.num_heads, layout=layout, **stack)
    if self.adaln:
      self.final_norm = norm.NormModulate(self.autodiff_backward, self.backward_kernels)
      self.final_modulation = nn.Dense(2 * self.decoder_width,
                                       kernel_init=nn.initializers.zeros)
    self.head = dense(self.patch_size ** 2 * 2 * self.channels,
                         kernel_init=nn.initializers.zeros)

  def null_labels(self, batch_size):
    return jnp.full((batch_size,), self.num_classes, jnp.int32)

  def condition(self, t, labels=None):
    """[B] time steps (0 = clean) and optional labels -> [B, width] condition."""
    cond = self.t_embedder(t)
    if self.num_classes:
      if labels is None:
        labels = self.null_labels(t.shape[0])
      cond = cond + self.y_embedder(labels)
    return cond

  def make_masking(self, batch_size, mask_ratio):
    masking_lib.check_mask_ratio(mask_ratio)
    if mask_ratio == 0:
      return masking_lib.no_masking(batch_size, self.num_patches)
    return masking_lib.draw(self.make_rng("mask"), batch_size, self.grid, mask_ratio,
                            self.block_mask_size)

  def encode(self, images, cond, masking):
    """Visible patches (+ cls tokens) through the encoder -> [B, num_cls + K, width]."""
    tokens = self.patch_embedding(patchify(images, self.patch_size)) + self.pos_embedding
    tokens = masking_lib.gather_tokens(tokens, masking.ids_keep)
    cls = jnp.broadcast_to(self.cls, (tokens.shape[0],) + self.cls.shape[1:])
    x = jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1)
    if not self.adaln:
      x = x + cond[:, None, :]
    return self.encoder_norm(self.encoder(x, cond))

  def _masked_queries(self, visible, masking, noised):
    """Decoder inputs at masked positions [B, N - K, decoder_width]: MAE's learned mask
    token, or DiffMAE's embedded patches of the noised images there."""
    b, k, d = visible.shape
    if self.noised_queries:
      queries = self.query_embedding(patchify(noised, self.patch_size))
      return masking_lib.gather_tokens(queries, masking_lib.masked_ids(masking)).astype(
          visible.dtype)
    return jnp.broadcast_to(self.mask_token, (b, self.num_patches - k, d)).astype(visible.dtype)

  def decoder_inputs(self, latent, masking, noised=None):
    """Encoder output -> decoder tokens [B, num_cls + N, decoder_width], in image order;
    for the cross decoders, (queries at the masked positions [B, N - K, decoder_width],
    the visible features they attend to [B, num_cls + K, decoder_width])."""
    x = self.decoder_embed(latent)
    cls, visible = x[:, :self.num_cls_tokens], x[:, self.num_cls_tokens:]
    queries = self._masked_queries(visible, masking, noised)
    if self.decoder_attention != "joint":
      posemb = jnp.broadcast_to(self.decoder_pos_embedding,
                                (x.shape[0],) + self.decoder_pos_embedding.shape[1:])
      at = lambda ids: masking_lib.gather_tokens(posemb, ids).astype(x.dtype)
      return (queries + at(masking_lib.masked_ids(masking)),
              jnp.concatenate([cls, visible + at(masking.ids_keep)], axis=1))
    patches = masking_lib.restore_tokens(visible, queries, masking.ids_restore)
    return jnp.concatenate([cls, patches + self.decoder_pos_embedding], axis=1)

  def decode_tokens(self, x, cond, context=None):
    """Decoder tokens -> per-patch predictions [B, N, p*p*2C]; for the cross decoders,
    queries attending to `context` -> predictions at their positions [B, N - K, ...]."""
    if not self.adaln:
      x = x + self.decoder_cond(cond)[:, None, :]
    x = self.decoder(x, cond, context)
    if self.adaln:
      shift, scale = jnp.split(self.final_modulation(nn.silu(cond))[:, None], 2, axis=-1)
      x = self.final_norm(x, shift, scale)
    else:
      x = self.decoder_norm(x)
    return self.head(x if context is not None else x[:, self.num_cls_tokens:]).astype(
        jnp.float32)

  def __call__(self, images, t, labels=None, *, mask_ratio=0.0, masking=None, noised=None,
               train=False):
    """Predicts x0 and eps for (possibly noised) images.

    Args:
      images: [B, H, W, C], clean (t = 0) or noised (t = diffusion step + 1); with
        decoder_queries="noised_patches" (DiffMAE) always clean: the encoder's input.
      t: [B] int time steps; 0 means clean.
      labels: [B] int class labels, or None (null class) for conditional models.
      mask_ratio: share of patches hidden from the encoder (needs a 'mask' rng).
      masking: a masking.Masking to use instead of drawing one; or a tuple of them for
        consecutive groups of the batch that keep different numbers of tokens (UMD's
        clean and noised halves). Each group goes through the encoder on its own, and
        all groups through the decoder together: the same result as separate calls,
        with one decoder pass of larger matrices.
      noised: DiffMAE's [B, H, W, C] images noised at t, whose masked patches are the
        decoder's queries (decoder_queries="noised_patches" only, where it is required).
      train: no effect on the model (label dropout is the objective's).
    Returns:
      dict(x0=[B,H,W,C], eps=[B,H,W,C], mask=[B,N] with 1 at masked patches).
    """
    b = images.shape[0]
    if masking is None:
      masking = self.make_masking(b, mask_ratio)
    groups = (masking,) if isinstance(masking, masking_lib.Masking) else tuple(masking)
    sizes = [m.mask.shape[0] for m in groups]
    if sum(sizes) != b:
      raise ValueError(f"maskings cover {sum(sizes)} images (groups of {sizes}); the batch "
                       f"has {b}")
    cond = encoder_cond = self.condition(t, labels)
    if self.noised_queries:
      if noised is None and not self.is_initializing():  # Never the clean masked patches.
        raise ValueError("decoder_queries='noised_patches' (DiffMAE) needs noised= (the "
                         "images noised at t, whose masked patches the decoder denoises)")
      noised = images if noised is None else noised
      encoder_cond = self.condition(jnp.zeros_like(t), labels)  # It sees clean patches.
    elif noised is not None:
      raise ValueError("noised= is DiffMAE's input (decoder_queries='noised_patches'); this "
                       "model's decoder queries are mask tokens")
    tokens, start = [], 0
    for m, size in zip(groups, sizes):
      sl = slice(start, start + size)
      tokens.append(self.decoder_inputs(self.encode(images[sl], encoder_cond[sl], m), m,
                                        None if noised is None else noised[sl]))
      start += size
    if self.decoder_attention != "joint":  # Predictions at the masked positions only.
      if len(groups) > 1:
        raise ValueError(f"decoder_attention={self.decoder_attention!r} decodes one group "
                         f"of images at a time, not {len(groups)}")
      queries, context = tokens[0]
      out = self.decode_tokens(queries, cond, context)
      out = masking_lib.restore_tokens(
          jnp.zeros((b, groups[0].ids_keep.shape[1], out.shape[-1]), out.dtype), out,
          groups[0].ids_restore)
    else:
      out = self.decode_tokens(tokens[0] if len(tokens) == 1 else
                               jnp.concatenate(tokens, axis=0), cond)
    out = unpatchify(out, self.grid, self.patch_size, 2 * self.channels)
    mask = jnp.concatenate([m.mask for m in groups], axis=0)
    return dict(x0=out[..., :self.channels], eps=out[..., self.channels:], mask=mask)

  def representation(self, images, t=None, labels=None):
    """[B, H, W, C] images -> [B, width] features: mean of the encoder's cls tokens.

    By default the images are taken as clean (t = 0) and unmasked, with the null label.
    """
    b = images.shape[0]
    t = jnp.zeros((b,), jnp.int32) if t is None else t
    latent = self.encode(images, self.condition(t, labels),
                         masking_lib.no_masking(b, self.num_patches))
    if self.num_cls_tokens:
      return latent[:, :self.num_cls_tokens].mean(axis=1)
    return latent.mean(axis=1)


# What the decoder sees at masked positions: MAE's mask token, or DiffMAE's noised patches.
DECODER_QUERIES = ("mask_token", "noised_patches")
# How the decoder reads the visible features: jointly, or DiffMAE's cross attention.
DECODER_ATTENTION = ("joint", "cross_self", "cross")

MODEL_OPTIONS = ("variant", "image_size", "channels", "num_cls_tokens", "adaln", "num_classes",
                 "posemb", "masking", "mask_block_size", "scan", "remat_policy", "dtype_mm",
                 "dtype_activations", "attention", "flat_dense", "autodiff_backward",
                 "backward_kernels", "decoder_width",
                 "decoder_depth", "decoder_mlp_dim", "decoder_queries", "decoder_attention")


def _resolve(model_config):
  """Model config (ConfigDict or dict) -> Model constructor kwargs, validated."""
  cfg = dict(model_config)
  unknown = sorted(set(cfg) - set(MODEL_OPTIONS))
  if unknown:
    raise ConfigError(f"unknown model option(s) {', '.join(unknown)}; known: "
                      f"{', '.join(MODEL_OPTIONS)}")
  if "variant" not in cfg or "image_size" not in cfg:
    raise ConfigError("model config needs 'variant' (e.g. 'B/4') and 'image_size'")
  variant = cfg.pop("variant")
  kw = decode_variant(variant)
  for key in ("decoder_width", "decoder_depth", "decoder_mlp_dim"):
    if cfg.get(key) is None:
      cfg.pop(key, None)
  kw.update(cfg)
  size = kw["image_size"]
  size = (size, size) if is_int(size) else size
  if (not isinstance(size, (tuple, list)) or len(size) != 2
      or not all(is_int(s) and s >= 1 for s in size)):
    raise ConfigError(f"image_size={kw['image_size']!r} must be a positive int or a pair of "
                      "them (height, width)")
  size = tuple(int(s) for s in size)
  kw["image_size"] = size
  for key, lowest in (("channels", 1), ("num_cls_tokens", 0), ("num_classes", 0),
                      ("decoder_width", 1), ("decoder_depth", 0), ("decoder_mlp_dim", 1),
                      ("mask_block_size", 1)):
    if key in kw and kw[key] is not None:
      check_int(key, kw[key], lowest)
  p = kw["patch_size"]
  if size[0] % p or size[1] % p:
    fitting = [q for q in range(1, min(size) + 1) if not size[0] % q and not size[1] % q]
    raise ConfigError(f"image size {size} is not divisible by the patch size {p} (variant "
                      f"{variant!r}); patch sizes that divide it: "
                      f"{', '.join(map(str, fitting))}")
  if kw.get("remat_policy", "none") not in REMAT_POLICIES:
    raise ConfigError(f"unknown remat_policy {kw['remat_policy']!r}; known: "
                      f"{', '.join(REMAT_POLICIES)}")
  for key in ("dtype_mm", "dtype_activations"):
    if kw.get(key, "float32") not in MATMUL_DTYPES:
      raise ConfigError(f"unknown {key} {kw[key]!r}; known: {', '.join(MATMUL_DTYPES)}")
  if kw.get("attention", "xla") not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(f"unknown attention {kw['attention']!r}; known: "
                      f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
  # A string like 'False' would count as True.
  for key in ("adaln", "scan", "flat_dense", "autodiff_backward"):
    if not isinstance(kw.get(key, True), bool):
      raise ConfigError(f"{key} must be True or False, not {kw[key]!r}")
  _check_backward_kernels(kw.get("backward_kernels", "xla"), kw.get("autodiff_backward", False))
  if kw.get("posemb", "sincos2d") not in ("sincos2d", "learn"):
    raise ConfigError(f"unknown posemb {kw['posemb']!r}; known: sincos2d, learn")
  if kw.get("masking", "random") not in ("random", "block"):
    raise ConfigError(f"unknown masking {kw['masking']!r}; known: random, block")
  if kw.get("decoder_queries", "mask_token") not in DECODER_QUERIES:
    raise ConfigError(f"unknown decoder_queries {kw['decoder_queries']!r}; known: "
                      f"{', '.join(DECODER_QUERIES)}")
  layout = kw.get("decoder_attention", "joint")
  if layout not in DECODER_ATTENTION:
    raise ConfigError(f"unknown decoder_attention {layout!r}; known: "
                      f"{', '.join(DECODER_ATTENTION)}")
  if layout != "joint" and (kw.get("decoder_queries") != "noised_patches"
                            or kw.get("adaln", True)):
    raise ConfigError(f"decoder_attention={layout!r} is DiffMAE's: it predicts the masked "
                      "patches alone, from noised-patch queries (decoder_queries="
                      "'noised_patches') with additive conditioning (adaln=False)")
  _check_masking(kw, mask_ratio=0.0)  # The block size, whatever the ratios.
  for key in ("width", "decoder_width"):
    if kw[key] % kw["num_heads"]:
      raise ConfigError(f"{key} {kw[key]} is not divisible by num_heads {kw['num_heads']} "
                        f"of variant {variant!r}: it must be a multiple of it")
  if kw.get("num_classes", 0) < 0:
    raise ConfigError(f"num_classes={kw['num_classes']} must be >= 0 (0: unconditional)")
  return kw


def _check_backward_kernels(kernels, autodiff_backward):
  if kernels not in fused_backward.KERNELS:
    raise ConfigError(f"unknown backward_kernels {kernels!r}; known: "
                      f"{', '.join(fused_backward.KERNELS)}")
  if not fused_backward.uses_pallas(kernels):
    return
  if autodiff_backward:
    raise ConfigError(f"backward_kernels={kernels!r} replaces the hand-written backward "
                      "passes that autodiff_backward=True turns off: set one of them")
  if kernels == "pallas" and jax.devices()[0].platform != "gpu":
    raise ConfigError(f"backward_kernels='pallas' compiles Triton kernels for an NVIDIA "
                      f"GPU; this process runs on {jax.devices()[0].device_kind} (use 'xla', "
                      "or 'pallas_interpret' to run the kernels in Pallas's interpreter)")


def _check_masking(kw, **mask_ratios):
  """masking.py's errors for the resolved model options, as one-line ConfigErrors: the
  block size must divide the patch grid, and a non-zero ratio must mask a token (block)."""
  grid = (kw["image_size"][0] // kw["patch_size"], kw["image_size"][1] // kw["patch_size"])
  try:
    for name, ratio in mask_ratios.items():
      if kw.get("masking", Model.masking) == "block":
        masking_lib.masked_blocks(grid, ratio, kw.get("mask_block_size", Model.mask_block_size),
                                  name)
      else:
        masking_lib.masked_tokens(grid[0] * grid[1], ratio, name)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_model_config(model_config, **mask_ratios):
  """ConfigError for a model config no run could build, or for a named mask ratio
  (e.g. mask_ratio=0.5) that this model would use and that masks nothing."""
  _check_masking(_resolve(model_config), **mask_ratios)


def build_model(model_config):
  """Builds the Model from a config like {variant: 'B/4', image_size: 64, ...}."""
  return Model(**_resolve(model_config))


def count_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def init_shapes(model, batch_size=2):
  """Parameter shapes without allocating them (jax.eval_shape)."""
  h, w = model.image_size
  images = jnp.zeros((batch_size, h, w, model.channels))
  t = jnp.zeros((batch_size,), jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1),
          "dropout": jax.random.PRNGKey(2)}
  return jax.eval_shape(lambda: model.init(rngs, images, t, mask_ratio=0.5)["params"])

