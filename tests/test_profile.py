"""The profile summary: op time put in categories and under the model's modules."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from big_vision import profile


@pytest.mark.parametrize("op_name,module", [
    ("jit(update)/transpose(jvp(Model))/Model.encode/encoder/block_03/mlp/fc1/fc1/dot_general",
     "backward encoder/block_*/mlp/fc1"),
    ("jit(update)/jvp(Model)/Model.encode/encoder/block_11/attn/vmap(BNTS,BSNH->BTNH)/transpose"
     ";jit(update)/jvp(Model)/Model.encode/encoder/block_11/attn/vmap()/transpose",
     "forward encoder/block_*/attn"),
    ("jit(update)/jvp(Model)/Model.encode/encoder/block_00/add", "forward encoder/block_*"),
    ("jit(update)/jvp(Model)/Model.decoder_inputs/jit(take_along_axis)/gather",
     "forward decoder_inputs"),
    ("jit(update)/jvp(Model)/Model.encode/patch_embedding/patch_embedding/dot_general",
     "forward encode/patch_embedding"),
    ("jit(update)/add", "outside the model: add"),
    # With remat: the backward pass repeats the scope, and recomputes the forward.
    ("jit(update)/transpose(jvp(Model))/Model.decode_tokens/decoder/jvp(Model)/"
     "Model.decode_tokens/decoder/checkpoint/block_01/mlp/fc1/fc1/dot_general",
     "backward decoder/block_*/mlp/fc1"),
    ("jit(update)/transpose(jvp(Model))/Model.decode_tokens/decoder/jvp(Model)/"
     "Model.decode_tokens/decoder/checkpoint/rematted_computation/block_00/mlp/fc1/fc1/add",
     "recomputed decoder/block_*/mlp/fc1"),
])
def test_module_of(op_name, module):
  assert profile.module_of(op_name) == module


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.gelu(nn.Dense(64, name=f"block_{i}")(x))
    return nn.Dense(1, name="head")(x)


def test_profile_by_module():
  """A real trace of a compiled training step: its ops are found under their modules in
  the HLO, and the matmuls of the Dense layers land under those layers."""
  net = _Net()
  x = jnp.ones((256, 64))
  params = net.init(jax.random.PRNGKey(0), x)

  @jax.jit
  def step(params):
    grads = jax.grad(lambda p: jnp.mean(net.apply(p, x) ** 2))(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  compiled = step.lower(params).compile()
  origins = profile.origins_from_hlo(compiled.as_text())
  assert any("block_1" in op_name for op_name in origins.values())

  def run(params):
    for _ in range(3):
      params = compiled(params)
    return jax.block_until_ready(params)

  _, summary = profile.profile(run, params, 3, hlo_text=compiled.as_text())
  by_module = summary["by_module_ms"]
  # The two hidden Dense layers' matmuls, forward and backward, under their name.
  assert by_module["forward block_*"]["matmul"] > 0, by_module
  assert by_module["backward block_*"]["matmul"] > 0, by_module
  assert any(m.startswith("outside the model: ") for m in by_module)  # The SGD update.
  total = sum(m["total"] for m in by_module.values())
  assert total == pytest.approx(summary["op_ms_per_step"])  # Every op somewhere.
  lines = profile.format_summary(summary)
  assert "profile by module (op time per step):" in lines
  # A CPU trace says that its op times overlap and miss Eigen's dots.
  assert summary["note"] == profile.CPU_NOTE and f"  note: {profile.CPU_NOTE}" in lines


@pytest.mark.parametrize("name,category", [
    ("convolution.3", "matmul"), ("cudnn-conv.1", "matmul"), ("dot.2", "matmul"),
    ("loop_convert_fusion.3", "elementwise"),  # Converts are not convolutions.
    ("wrapped_convert.2", "other"), ("convert.7", "other"),
    # Kernel names of an H200 trace (jax 0.11): cuBLAS, Triton and cuDNN attention.
    ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "matmul"), ("gemm_fusion_dot_161", "matmul"),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize256x128x32", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64", "attention"),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)", "attention"),
    ("input_add_reduce_fusion_85", "elementwise"),
    ("layer_norm_modulate_backward", "elementwise"),  # backward_kernels=pallas.
])
def test_categorise(name, category):
  assert profile.categorise(name) == category


class _Event:
  def __init__(self, name, ns, stats):
    self.name, self.duration_ns, self.stats = name, ns, list(stats.items())


class _Line:
  def __init__(self, name, events):
    self.name, self.events = name, events


class _Plane:
  def __init__(self, name, lines):
    self.name, self.lines = name, lines


def test_gpu_trace_of_cuda_graphs():
  """Where XLA runs the step as CUDA graphs, a GPU trace has no "XLA Ops" line: its stream
  lines hold the kernels, named like their HLO instruction with "_N" for ".N", and their
  tf_op names no operation."""
  graph = {"tf_op": "XlaModule:", "hlo_op": "command_buffer_1"}
  stream = _Line("Stream #14(Memset,Compute)", [
      _Event("gemm_fusion_dot_3", 3e6, graph), _Event("loop_add_fusion_2", 1e6, graph),
      _Event("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 2e6, graph)])
  trace = types.SimpleNamespace(planes=[_Plane("/device:GPU:0", [stream]),
                                        _Plane("/host:CPU", [_Line("python3", [])])])
  hlo = ('  %gemm_fusion_dot.3 = bf16[8,8]{1,0} fusion(%a), metadata={op_name='
         '"jit(update)/jvp(Model)/Model.encode/encoder/block_00/mlp/fc1/dot_general"}\n'
         '  %loop_add_fusion.2 = bf16[8,8]{1,0} fusion(%b), metadata={op_name='
         '"jit(update)/jvp(Model)/Model.encode/encoder/block_00/add"}\n')
  summary = profile.summarise(trace, 1, origins=profile.origins_from_hlo(hlo))
  assert summary["by_category_ms"] == {"matmul": 5.0, "elementwise": 1.0}
  by_module = summary["by_module_ms"]
  assert by_module["forward encoder/block_*/mlp/fc1"] == {"total": 3.0, "matmul": 3.0}
  assert by_module["forward encoder/block_*"] == {"total": 1.0, "elementwise": 1.0}
  assert by_module["unattributed"]["matmul"] == 2.0  # cuBLAS's kernel: no HLO name.
