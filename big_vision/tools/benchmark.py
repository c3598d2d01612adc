r"""Measures where time goes: training step, sampling, input pipeline and evaluation.

  python -m big_vision.tools.benchmark --config configs/ae_fmnist.py:variant=S/4 --out bench.json

Training step: images/s and the median step time on synthetic batches (so the input
pipeline does not interfere; on an accelerator, steps dispatched back to back in rounds
of PIPELINED_STEPS, as the trainer dispatches them), compile time, peak memory, model
FLOPs per image (forward + backward, from XLA's cost analysis of the same step compiled
WITHOUT scan, rematerialisation and gradient accumulation, since XLA counts a loop body
once and remat adds recomputation), achieved FLOP/s and its share of the device's peak:
on a CPU the fp32 matmul rate this command measures on the same machine in the same run;
on a GPU the vendor's dense bf16 figure (none for a GPU not in GPU_PEAKS, or another
accelerator: no share of peak then), and the rate of a large bf16 matmul measured on the
same card. Sampling: images/s of the config's sampler. Input: images/s of the training
pipeline alone. Evaluation: seconds of the few-shot probe and of FID on the config's
sample count (when the feature network's weights exist).

  --compare      also times the step's variants against the config's own, in turns
                 (two steps of each, the second timed): the straightforward objective
                 (a model call per branch), nn.Dense's 3-D dots, both, scan, remat,
                 scan + remat; prints each one's img/s and its step time relative to
                 the config's (median over rounds).
  --ablate       also times the step with one part at a time replaced by a cheap stand-in
                 (ABLATIONS: the attention core, GELU, the LayerNorms' statistics,
                 AdamW), in turns with the config's step, and prints the wall time each
                 part takes: on a CPU the profile cannot say this (profile.CPU_NOTE).
  --compile_only compiles the step and reports XLA's memory analysis without running it:
                 an estimate of device memory for a device this machine does not have.
  --out          the JSON file of the figures (default_out_path: under
                 workdirs/benchmarks/, named by platform, variant, batch and time).
"""
import contextlib
import copy
import json
import os
import re
import resource
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from big_vision import config_cli
from big_vision import diffusion as diffusion_lib
from big_vision import host_allocator
from big_vision import methods
from big_vision import objective
from big_vision import optimizer as optimizer_lib
from big_vision import profile
from big_vision import sharding
from big_vision import train_step
from big_vision.models import ae
from big_vision.models import gelu
from big_vision.models import masking
from big_vision.models import norm

# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s, keyed by
# the words of jax's device_kind that name the model ("NVIDIA H100 PCIe" -> H100 PCIE). The
# most specific first: an H100 PCIe or NVL is not an SXM (the plain "NVIDIA H100 80GB HBM3").
# Whole words: "L4" is not "L40S", and "A10" is not "A10G" (no data sheet figure: unknown).
GPU_PEAKS = (
    (("H100", "PCIE"), 756e12), (("H100", "NVL"), 835e12), (("H100",), 989e12),
    (("H200", "NVL"), 835e12), (("H200",), 989e12),
    (("A100",), 312e12),  # SXM and PCIe alike.
    (("L40S",), 362e12), (("L40",), 181e12), (("L4",), 121e12), (("A10",), 125e12),
)


PIPELINED_STEPS = 5  # Steps a timing round dispatches back to back (see bench_train_step).
PAIRED_REPEATS = 5  # Reference matmuls timed between two CPU steps (their median counts).


def matmul_timer(n=2048, dtype=jnp.float32, calls=1, repeats=1):
  """A function that times `repeats` rounds of `calls` n x n matmuls back to back on the
  default device (on random data: zeros run faster on some GPUs) and returns the median
  round's FLOP/s."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()

  def one_round():
    start = time.perf_counter()
    for _ in range(calls):
      out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * calls / (time.perf_counter() - start)
  return lambda: statistics.median(one_round() for _ in range(repeats))


def matmul_peak(n=2048, dtype=jnp.float32, repeats=10, calls=1):
  """FLOP/s of an n x n matmul on the default device (median of `repeats` timings): the
  CPU's reference peak, and a GPU's achievable bf16 rate."""
  return matmul_timer(n, dtype, calls, repeats)()


def gpu_peak(device_kind):
  """The dense bf16 peak of one GPU of this device_kind (GPU_PEAKS), or None if unknown."""
  words = set(re.split(r"[\s_-]+", device_kind.upper()))
  for names, peak in GPU_PEAKS:
    if words.issuperset(names):
      return peak
  return None


def device_peak():
  """(peak FLOP/s or None where unknown, how it was obtained or why there is none)."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return matmul_peak() * jax.device_count(), "measured fp32 2048x2048 matmul rate"
  peak = gpu_peak(device.device_kind) if device.platform == "gpu" else None
  if peak is None:  # An fp32 matmul is no peak for a bf16 step: better none than wrong.
    return None, (f"no known peak for {device.device_kind!r} ({device.platform}); add its "
                  "dense bf16 figure to benchmark.GPU_PEAKS")
  return peak * jax.device_count(), f"vendor dense bf16 peak of {device.device_kind}"


def peak_memory_bytes():
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "device peak bytes in use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS of the process"


def _setup(config, total_steps=1000):
  """Model, diffusion, jitted update and a fresh state, as the trainer builds them."""
  mesh = sharding.make_mesh()
  model = ae.build_model(config.model)
  diffusion = diffusion_lib.GaussianDiffusion.create(config.diffusion.schedule,
                                                     config.diffusion.timesteps)
  init_params = train_step.make_init_params(model)
  abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx, lr_fn = optimizer_lib.make(config, abstract, total_steps, 10)
  init_state = train_step.make_init_state(config, init_params, tx)
  state_shardings = sharding.tree_shardings(jax.eval_shape(init_state, jax.random.PRNGKey(0)),
                                            mesh, config.param_sharding)
  data_sharding = sharding.batch_sharding(mesh)
  update = train_step.make_update(config, model, diffusion, tx, lr_fn, jax.random.PRNGKey(1),
                                  config.input.batch_size, mesh.devices.size, data_sharding)
  update = jax.jit(update, in_shardings=(state_shardings, data_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))
  state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.PRNGKey(0))
  b = config.input.batch_size
  h, w = model.image_size
  batch = {"image": jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(2), (b, h, w, model.channels), minval=-1,
                         maxval=1), data_sharding),
           "label": jax.device_put(jnp.arange(b) % max(model.num_classes, 1), data_sharding)}
  return model, diffusion, update, state, batch


def xla_memory_bytes(compiled):
  """Arguments + outputs + temporaries of a compiled step, from XLA's buffer assignment."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
             + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)


def compile_only(config):
  """XLA's memory estimate of the training step, compiled and never run."""
  _, _, update, state, batch = _setup(config)
  start = time.perf_counter()
  compiled = update.lower(state, batch).compile()
  return dict(xla_memory_analysis_bytes=xla_memory_bytes(compiled),
              compile_s=time.perf_counter() - start)


# The step's variants --compare times: (name, config overrides).
VARIANTS = (
    ("straightforward objective (a model call per branch)", {"one_model_call": False}),
    ("nn.Dense as written (a 3-D dot per token Dense)", {"model.flat_dense": False}),
    ("autodiff of GELU, LayerNorm and softmax", {"model.autodiff_backward": True}),
    ("straightforward objective + nn.Dense", {"one_model_call": False,
                                             "model.flat_dense": False}),
    ("scan", {"model.scan": True}),
    ("remat nothing_saveable", {"model.remat_policy": "nothing_saveable"}),
    ("remat dots_saveable", {"model.remat_policy": "dots_saveable"}),
    ("scan + remat nothing_saveable", {"model.scan": True,
                                       "model.remat_policy": "nothing_saveable"}),
)


def _override(config, overrides):
  """A copy of config with {"a.b": value} overrides."""
  variant = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = variant
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return variant


def _time_in_turns(config_step, variants, steps):
  """Times CompiledSteps {name: step} in turns with config_step; returns the config's step
  times and {name: step times}, one of each per round.

  Every round runs two steps of the config and then two of each variant, and times the
  second of each pair: a shared machine's speed drifts within seconds, so a variant is
  compared with the config's step of the same round. The untimed first step of a turn
  takes the switch between programs (a CPU step that follows a smaller one page-faults
  its buffers in again: +25% on the S/4 step).
  """
  base, times = [], {name: [] for name in variants}

  def timed_turn(step):
    step.run()
    return step.run()

  for _ in range(steps):
    base.append(timed_turn(config_step))
    for name, step in variants.items():
      times[name].append(timed_turn(step))
  return base, times


def compare_variants(config_step, config, steps, log=print):
  """Each variant in VARIANTS timed against the config's own step, in turns
  (_time_in_turns); its cost is the median over rounds of its step time over the
  config's."""
  variants = {name: CompiledStep(_override(config, overrides))
              for name, overrides in VARIANTS}
  base, times = _time_in_turns(config_step, variants, steps)
  result = {}
  for name, step in variants.items():
    cost = statistics.median(t / b for t, b in zip(times[name], base)) - 1
    step_s = statistics.median(times[name])
    result[name] = dict(images_per_s=config.input.batch_size / step_s, step_s=step_s,
                        time_cost_vs_config=cost, step_times_s=times[name],
                        config_step_times_s=base,
                        xla_memory_analysis_bytes=xla_memory_bytes(step.compiled))
    log(f"  {name}: {result[name]['images_per_s']:.1f} img/s ({cost:+.1%} step time, "
        f"median of {steps} rounds), XLA memory "
        f"{result[name]['xla_memory_analysis_bytes'] / 2**30:.2f} GiB")
  return result


def analytic_flops_per_image(config):
  """Matmul FLOPs per image of a training step (forward + backward = 3 x forward).

  Counts every Dense layer and the two attention products at the token counts the
  objective feeds (visible tokens + cls in the encoder, all tokens + cls in the decoder),
  weighted by the clean and noised shares of the batch; elementwise work is not counted.
  A cross-check of XLA's count, which also counts elementwise operations.
  """
  model = ae.build_model(config.model)
  d, dd = model.width, model.decoder_width
  n, cls = model.num_patches, model.num_cls_tokens
  patch_in = model.patch_size ** 2 * model.channels

  def blocks(tokens, width, mlp_dim, depth, context=0, self_attention=True):
    """Blocks over `tokens` tokens; with a context, cross-attending to that many."""
    per_token = 2 * width * mlp_dim  # The MLP.
    attention = 0
    if self_attention:
      per_token += 4 * width * width  # qkv, proj.
      attention += 2 * tokens * tokens * width  # q.k^T and p.v
    if context:
      per_token += 2 * width * width  # q, proj; kv below, per context token.
      attention += 2 * tokens * context * width + 2 * context * width * width
    return 2 * depth * (tokens * per_token + attention)

  def forward(mask_ratio):
    kept = masking.num_kept(n, mask_ratio)
    enc = blocks(kept + cls, d, model.mlp_dim, model.depth)
    decoded = n  # Tokens the head predicts.
    if model.decoder_attention == "joint":
      dec = blocks(n + cls, dd, model.decoder_mlp_dim or 4 * dd, model.decoder_depth)
    else:  # DiffMAE's cross decoders: the masked queries attend to the visible features.
      decoded = n - kept
      dec = blocks(decoded, dd, model.decoder_mlp_dim or 4 * dd, model.decoder_depth,
                   context=kept + cls, self_attention=model.decoder_attention == "cross_self")
    # Patch embedding (of every patch, before the visible ones are picked), decoder
    # embedding, head, and the time MLP (256 sinusoid features -> width -> width).
    other = 2 * (n * patch_in * d + (kept + cls) * d * dd + decoded * dd * 2 * patch_in
                 + 256 * d + d * d)
    if model.noised_queries:  # DiffMAE: queries, the encoder's t = 0.
      other += 2 * (n * patch_in * dd + 256 * d + d * d)
    return enc + dec + other + condition_flops_per_image(model)

  b = config.input.batch_size
  n_clean, n_noised = objective.split_sizes(b, config.no_noise_prob)
  total = (n_clean * forward(config.mask_ratio_no_noise) if n_clean else 0) + (
      n_noised * forward(config.mask_ratio) if n_noised else 0)
  return 3 * total / b


def condition_flops_per_image(model):
  """Forward FLOPs per image of the Dense layers that take the condition (encoder width)."""
  d, dd = model.width, model.decoder_width
  if model.adaln:  # Each block's modulation (6 x its width), and the decoder's final one.
    return 2 * d * (6 * d * model.depth + 6 * dd * model.decoder_depth + 2 * dd)
  return 2 * d * dd  # The condition added to the decoder's tokens.


def _xla_flops_per_image(lowered, batch_size, compiled=None):
  """XLA's FLOP count of the step per image, or None where XLA cannot count it.

  The lowered HLO is counted where the backend can (the CPU); else the compiled program
  (compiled here if not given), but only on a CPU: a GPU program's matmuls are library
  calls (cuBLAS, cuDNN) that XLA's cost analysis counts as zero (23 of 108 GFLOP per
  image for B/4 on an H100).
  """
  def flops(stage):
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None
  count = flops(lowered)
  if count is None and jax.devices()[0].platform == "cpu":
    count = flops(compiled or lowered.compile())
  return None if count is None else count / batch_size


# What flops_per_image takes out of a config: loops whose body XLA counts once (scanned
# blocks, gradient accumulation's scan over micro-batches) and remat's recomputation.
_PLAIN = {"model.scan": False, "model.remat_policy": "none", "grad_accum_steps": 1}


def _is_plain(config):
  return (not config.model.scan and config.model.remat_policy == "none"
          and config.get("grad_accum_steps", 1) == 1)


def flops_per_image(config):
  """XLA's forward + backward FLOPs per image of the step, unscanned, un-remat and without
  gradient accumulation (None where XLA cannot count them)."""
  plain = _override(config, _PLAIN)
  _, _, update, state, batch = _setup(plain)
  return _xla_flops_per_image(update.lower(state, batch), config.input.batch_size)


def _attention_stand_in(q, k, v, implementation, autodiff=False):
  del implementation, autodiff
  # One elementwise pass and a mean over the keys (cross-attention has fewer queries than
  # keys); q, k and v still get gradients.
  return q + (k + v).mean(axis=1, keepdims=True)


def _layer_norm_stand_in(x, shift, scale, epsilon=norm.EPSILON, kernels="xla"):
  del epsilon, kernels
  return x * (1 + scale) + shift


def _sgd(config, params, total_steps, warmup_steps):
  del config, params, total_steps, warmup_steps
  return optax.sgd(1e-3), optax.constant_schedule(1e-3)


# The parts --ablate replaces, one at a time: (name, module, attribute, stand-in). The
# stand-ins are cheap and not the same function: the difference in step time is the part's
# wall time (on the default path: autodiff_backward=True keeps the LayerNorms and GELU).
ABLATIONS = (
    ("attention core (QK^T, softmax, PV), by q plus the mean of k and v", ae,
     "attention_core", _attention_stand_in),
    ("GELU, by ReLU", gelu, "gelu", jax.nn.relu),
    ("LayerNorm statistics, by the modulation alone", norm, "layer_norm_modulate",
     _layer_norm_stand_in),
    ("AdamW, by SGD", optimizer_lib, "make", _sgd),
)


@contextlib.contextmanager
def _replaced(module, attribute, value):
  original = getattr(module, attribute)
  setattr(module, attribute, value)
  try:
    yield
  finally:
    setattr(module, attribute, original)


def ablate_parts(config_step, config, steps, log=print):
  """The wall time of each part in ABLATIONS: the step compiled with the part replaced by
  its stand-in, timed in turns with the config's step (_time_in_turns); the part's time
  is the median over rounds of the config's step time less the variant's."""
  variants = {}
  for name, module, attribute, stand_in in ABLATIONS:
    with _replaced(module, attribute, stand_in):  # While the step is traced.
      variants[name] = CompiledStep(config)
  base, times = _time_in_turns(config_step, variants, steps)
  step_s = statistics.median(base)
  result = {}
  for name, step_times in times.items():
    saved = statistics.median(b - t for b, t in zip(base, step_times))
    result[name] = dict(step_time_saved_s=saved, share_of_step=saved / step_s,
                        step_times_s=step_times, config_step_times_s=base)
    log(f"  {name}: {saved * 1e3:.0f} ms of the {step_s * 1e3:.0f} ms step "
        f"({saved / step_s:.1%}; median of {steps} rounds)")
  return result


class CompiledStep:
  """A config's training step, compiled and warmed up, on a fresh state and synthetic batch."""

  def __init__(self, config):
    self.model, self.diffusion, update, self.state, self.batch = _setup(config)
    start = time.perf_counter()
    self.lowered = update.lower(self.state, self.batch)
    self.compiled = self.lowered.compile()
    self.compile_s = time.perf_counter() - start
    for _ in range(2):  # Warm-up.
      self.run()

  def run(self, n=1):
    """Runs n steps; returns their wall time in seconds."""
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def bench_train_step(config, steps, profile_steps=0, between_steps=None):
  """Times `steps` compiled steps after a warm-up. between_steps(), if given, runs before
  the first and after each timed step, and its steps + 1 results are returned (the CPU's
  matmul rate, so that each step is compared with the machine's speed around it).
  Without it, the steps run back to back in rounds of PIPELINED_STEPS, each timed as a
  whole: the trainer waits for a step only at log steps, so the host dispatches the next
  step while the device runs this one (on an H200, a step waited for alone took 86.0 ms
  against 81.8 ms back to back). step_times_s are then the rounds' time per step.
  Returns (figures, the CompiledStep)."""
  step = CompiledStep(config)
  between = [between_steps()] if between_steps else []
  times = []
  if between_steps:
    for _ in range(steps):
      times.append(step.run())
      between.append(between_steps())
  else:
    group = min(steps, PIPELINED_STEPS)
    times = [step.run(group) / group for _ in range(max(1, steps // group))]
  step_s = statistics.median(times)
  mem, mem_how = peak_memory_bytes()
  timing = ("each step waited for, a matmul timed between steps" if between_steps else
            f"median of {len(times)} rounds of {group} steps dispatched back to back")
  result = dict(images_per_s=config.input.batch_size / step_s, step_s=step_s, timing=timing,
                compile_s=step.compile_s, peak_memory_bytes=mem, peak_memory_source=mem_how,
                xla_memory_analysis_bytes=xla_memory_bytes(step.compiled), step_times_s=times)
  if between_steps:
    result["between_steps"] = between
  if _is_plain(config):  # The FLOP count needs no second compilation.
    result["xla_flops_per_image"] = _xla_flops_per_image(step.lowered,
                                                         config.input.batch_size,
                                                         step.compiled)
  if profile_steps:
    try:  # The timing above stands without it: a profiler that fails loses only itself.
      _, result["profile"] = profile.profile(lambda _: step.run(profile_steps), None,
                                             profile_steps, hlo_text=step.compiled.as_text())
    except Exception as e:  # pylint: disable=broad-except
      result["profile"] = f"failed: {type(e).__name__}: {e}"
  return result, step


def bench_sampling(config, model, diffusion, params, num_samples):
  """img/s of DDIM at the config's sampling_timesteps on one device (one jitted call per
  batch; the sampling evaluator splits its batches over every device), without its
  reference data."""
  h, w = model.image_size
  steps = config.diffusion.sampling_timesteps
  labels = model.null_labels(num_samples) if model.num_classes else None

  def generate(params, rng):
    return diffusion_lib.ddim_sample(
        objective.model_eps_fn(model, params), diffusion, (num_samples, h, w, model.channels),
        rng, sampling_timesteps=steps, eta=config.diffusion.get("eta", 0.0),
        clip_x0=config.diffusion.get("clip_x0", True), labels=labels,
        null_label=model.num_classes if model.num_classes else None)
  compiled = jax.jit(generate).lower(params, jax.random.PRNGKey(0)).compile()
  jax.block_until_ready(compiled(params, jax.random.PRNGKey(0)))  # Warm-up.
  start = time.perf_counter()
  jax.block_until_ready(compiled(params, jax.random.PRNGKey(1)))
  seconds = time.perf_counter() - start
  # All steps in one program: the compiled sampler holds the step loop (a while loop on
  # the device), so a batch costs one call and no host round-trip per step.
  return dict(images_per_s=num_samples / seconds, sampling_timesteps=steps, sampler="ddim",
              seconds=seconds, num_samples=num_samples,
              steps_in_one_program=" while(" in compiled.as_text())


def bench_input(config, batches):
  # Imported here: the step and the sampler are timed without TensorFlow installed.
  from big_vision import input_pipeline  # pylint: disable=g-import-not-at-top
  ds, _ = input_pipeline.training(config.input, seed=0)
  it = ds.as_numpy_iterator()
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return dict(images_per_s=batches * config.input.batch_size / (time.perf_counter() - start))


def bench_evals(config, model, diffusion, params):
  from big_vision.evaluators import common  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  context = common.Context(model=model, diffusion=diffusion, config=config, workdir="/tmp",
                           mesh=mesh, data_sharding=sharding.batch_sharding(mesh))
  result = {}
  for name, spec in (config.get("evals") or {}).items():
    if spec.get("type") not in ("fewshot", "sampling"):
      continue
    one = copy.deepcopy(config)
    one.evals = {name: spec}
    built = common.build(one, context, 1, 1, log=lambda *_: None)
    if not built:
      result[name] = "skipped (missing weights or data)"
      continue
    start = time.perf_counter()
    list(built[0].evaluator.run(params, 0))
    result[name + "_seconds"] = time.perf_counter() - start
  return result


def run(config, steps=10, sample_count=None, input_batches=50, evals=True, compare=False,
        sampling=True, profile_steps=0, log=print, out_path=None, ablate=False):
  """Measures every part; returns the figures, also written as JSON to out_path if given.

  The JSON is written even when a part fails (with the error under "error"): what was
  measured before it is kept.
  """
  device = jax.devices()[0]
  out = dict(device=device.device_kind, platform=device.platform,
             num_devices=jax.device_count(), batch_size=config.input.batch_size,
             variant=config.model.variant, image_size=config.model.image_size,
             dtype_mm=config.model.dtype_mm, scan=config.model.scan,
             remat_policy=config.model.remat_policy,
             attention=config.model.get("attention", "xla"),
             one_model_call=config.get("one_model_call", True),
             host_allocator=host_allocator.active(), jax_version=jax.__version__)
  try:
    _measure(out, config, steps, sample_count, input_batches, evals, compare, sampling,
             profile_steps, log, ablate)
  except BaseException as e:
    out["error"] = f"{type(e).__name__}: {e}"
    raise
  finally:
    if out_path:
      write_json(out, out_path)
      log(f"wrote {out_path}")
  return out


def default_out_path(config):
  """workdirs/benchmarks/PLATFORM_VARIANT_bBATCH_UTCTIME.json, where --out is not given."""
  name = (f"{jax.devices()[0].platform}_{config.model.variant.replace('/', '')}"
          f"_b{config.input.batch_size}_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
  return os.path.join("workdirs", "benchmarks", name + ".json")


def write_json(out, path):
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(out, fh, indent=2, default=float)


def _measure(out, config, steps, sample_count, input_batches, evals, compare, sampling,
             profile_steps, log, ablate=False):
  """run's parts, each adding its figures to `out` as soon as it has them."""
  device = jax.devices()[0]
  if out["platform"] == "cpu" and out["host_allocator"] == "glibc":
    log("note: glibc malloc; see big_vision/host_allocator.py (BV_JEMALLOC=0 was set, or "
        "jemalloc is not installed)")
  peak, peak_how = device_peak()
  out.update(peak_flops=peak, peak_source=peak_how)
  if device.platform == "gpu":
    # What the matrix units give on this card (a large bf16 matmul through XLA), beside
    # the vendor's figure: the part of the gap to the peak that no step can close.
    out["measured_matmul_flops"] = matmul_peak(8192, jnp.bfloat16, calls=10)
    log(f"bf16 8192^3 matmul: {out['measured_matmul_flops'] / 1e12:.0f} TFLOP/s"
        + (f" ({out['measured_matmul_flops'] / peak:.0%} of the vendor's peak)" if peak
           else ""))
  # On a CPU, a reference matmul is timed before and after each timed step: machines
  # shared with other work change speed within seconds (the 2048^2 rate moved between 85
  # and 141 GFLOP/s within one run), and a step is best compared with its neighbours.
  # The median of PAIRED_REPEATS matmuls: the first one after a step reads low (6% at the
  # median of 22 gaps, up to 28%; 2026-11-29), which made the step look faster than it is.
  paired = matmul_timer(repeats=PAIRED_REPEATS) if device.platform == "cpu" else None
  step, compiled_step = bench_train_step(config, steps, profile_steps, paired)
  out["train"] = step
  xla = step["xla_flops_per_image"] if "xla_flops_per_image" in step else flops_per_image(
      config)
  analytic = analytic_flops_per_image(config)
  if xla:
    fpi, source = xla, "XLA cost analysis, unscanned, no remat, no grad accumulation"
  else:
    fpi, source = analytic, (f"analytic matmul count (XLA's cost analysis on {device.platform} "
                             "counts library matmuls as zero)")
  achieved = fpi * step["images_per_s"]
  share = lambda flops: None if peak is None else flops / peak  # No peak: no share of it.
  out["train"].update(flops_per_image=fpi, flops_source=source, xla_flops_per_image=xla,
                      analytic_matmul_flops_per_image=analytic,
                      achieved_flops=achieved, fraction_of_peak=share(achieved),
                      fraction_of_peak_analytic=share(analytic * step["images_per_s"]))
  if "measured_matmul_flops" in out:
    out["train"]["fraction_of_measured_matmul"] = (analytic * step["images_per_s"]
                                                   / out["measured_matmul_flops"])
  if paired:
    rates = step.pop("between_steps")
    b, n = config.input.batch_size, jax.device_count()
    out["train"].update(
        matmul_rates_between_steps=rates,
        fraction_of_peak_paired=statistics.median(
            2 * fpi * b / t / ((before + after) * n)
            for t, before, after in zip(step["step_times_s"], rates, rates[1:])))
  log(f"train: {step['images_per_s']:.1f} img/s, step {step['step_s'] * 1e3:.1f} ms, "
      f"compile {step['compile_s']:.1f} s, {fpi / 1e9:.2f} GFLOP/img ({source}; "
      f"analytic matmuls {analytic / 1e9:.2f}), "
      f"{achieved / 1e9:.1f} GFLOP/s = "
      + (f"{achieved / peak:.1%} of {peak / 1e9:.1f} GFLOP/s ({peak_how})" if peak
         else f"an unknown share of peak: {peak_how}")
      + f"; peak memory {step['peak_memory_bytes'] / 2**30:.2f} GiB")
  if paired:
    log(f"  against the matmuls timed right before and after each step: "
        f"{out['train']['fraction_of_peak_paired']:.1%} (median of {steps} pairs; the median "
        f"of {PAIRED_REPEATS} matmuls in each gap ran at {min(rates) / 1e9:.0f}-"
        f"{max(rates) / 1e9:.0f} GFLOP/s a device)")
  if profile_steps and isinstance(step["profile"], str):
    log(f"profile: {step['profile']}")
  elif profile_steps:
    for line in profile.format_summary(step["profile"]):
      log(line)
  if compare:
    log("variants of the step:")
    out["train_variants"] = compare_variants(compiled_step, config, steps, log)
  if ablate:
    log("where the step's wall time goes (each part replaced by a cheap stand-in):")
    out["train_ablations"] = ablate_parts(compiled_step, config, steps, log)
  model, diffusion = compiled_step.model, compiled_step.diffusion
  params = compiled_step.state["params"]
  if sampling and model.noised_queries:
    out["sampling"] = "skipped: DiffMAE generates masked patches given visible ones only"
    log(f"sampling: {out['sampling']}")
  elif sampling:
    n = sample_count or min(config.input.batch_size, 64)
    out["sampling"] = bench_sampling(config, model, diffusion, params, n)
    log(f"sampling: {out['sampling']['images_per_s']:.2f} img/s with "
        f"{out['sampling']['sampling_timesteps']} {out['sampling']['sampler']} steps, "
        f"{n} images a batch ("
        f"{'all in one program' if out['sampling']['steps_in_one_program'] else 'NOT one program'})")
  try:
    out["input"] = bench_input(config, input_batches)
    log(f"input pipeline: {out['input']['images_per_s']:.0f} img/s "
        f"({out['input']['images_per_s'] / step['images_per_s']:.1f}x the training step)")
  except (FileNotFoundError, ImportError) as e:  # No dataset or no TensorFlow here.
    out["input"] = f"skipped: {e}"
    log(f"input pipeline: skipped: {e}")
  if evals:
    try:
      out["evals"] = bench_evals(config, model, diffusion, params)
    except ImportError as e:  # The evaluators read their data with TensorFlow.
      out["evals"] = f"skipped: {e}"
    log(f"evals: {out['evals']}")


def main(argv, config):
  del argv
  f = flags.FLAGS
  out_path = f.out or default_out_path(config)
  if f.compile_only:
    out = dict(config=dict(variant=config.model.variant, image_size=config.model.image_size,
                           batch_size=config.input.batch_size, dtype_mm=config.model.dtype_mm,
                           scan=config.model.scan, remat_policy=config.model.remat_policy),
               compiled_for=jax.devices()[0].device_kind, **compile_only(config))
    print(f"compiled in {out['compile_s']:.1f} s; XLA memory analysis "
          f"{out['xla_memory_analysis_bytes'] / 2**30:.2f} GiB (arguments + outputs + "
          f"temporaries of the step, {out['compiled_for']} buffer assignment)")
    write_json(out, out_path)
    print(f"wrote {out_path}")
  else:
    run(config, steps=f.steps, sample_count=f.samples, evals=f.evals, compare=f.compare,
        sampling=f.sampling, profile_steps=f.profile_steps, out_path=out_path,
        ablate=f.ablate)


if __name__ == "__main__":
  host_allocator.restart_with_jemalloc()  # Before any XLA work.
  flags.DEFINE_integer("steps", 10, "Timed training steps (after compilation); on an "
                       "accelerator in rounds of PIPELINED_STEPS (a remainder is not timed).")
  flags.DEFINE_integer("samples", None, "Images to sample (default: min(batch, 64)).")
  flags.DEFINE_bool("evals", True, "Also time the few-shot probe and FID.")
  flags.DEFINE_bool("sampling", True, "Also time the config's sampler.")
  flags.DEFINE_integer("profile_steps", 0, "Also trace this many steps with jax.profiler "
                       "and print the device time by category and the costliest ops.")
  flags.DEFINE_string("out", None, "Write the figures as JSON here (default: "
                      "workdirs/benchmarks/PLATFORM_VARIANT_bBATCH_UTCTIME.json).")
  flags.DEFINE_bool("compare", False, "Also time the straightforward objective, scan and remat.")
  flags.DEFINE_bool("ablate", False, "Also time the step with the attention core, GELU, "
                    "the LayerNorms' statistics and AdamW each replaced by a cheap stand-in.")
  flags.DEFINE_bool("compile_only", False, "Only compile the step; report XLA's memory estimate.")
  cfg, rest = config_cli.load_or_exit(sys.argv[1:], check=methods.check_config)
  app.run(lambda argv: main(argv, cfg), argv=[sys.argv[0]] + rest)
