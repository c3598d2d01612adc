"""Where a compiled step spends its device time: a jax.profiler trace, summarised.

  state, summary = profile(run_steps, state, num_steps)

runs `run_steps(state)` (which must block until its steps are done) under
`jax.profiler.trace`, reads the trace back with `jax.profiler.ProfileData` and sums the
time of every XLA op, per step: on a GPU the ops of the device's "XLA Ops" line, or the
kernels on its streams where the step runs as CUDA graphs; on a CPU those of XLA's worker
threads. Ops are put in categories by their HLO name and the JAX operation they came
from (the `tf_op` stat, e.g. ".../attn/qkv/dot_general"):

  matmul       dots, cuBLAS / Triton GEMMs, convolutions
  attention    fused attention kernels (cuDNN's flash attention)
  elementwise  every other fusion (norms, activations, residual adds, the optimizer)
  copy         copies and transposes outside fusions
  other        the rest (random numbers, sorts, gathers, reductions outside fusions)

Given the compiled program's HLO text, each op is also put under the model module it
computes, forward or backward ("backward encoder/block_*/mlp"): XLA:CPU's trace names an
op only by its HLO instruction, and the HLO's metadata says which JAX operation, in which
module, it came from.
"""
import collections
import glob
import os
import re
import tempfile

import jax

# cuDNN's flash attention runs as "..._sdpa_..._flash_..." kernels and, in its backward
# pass, helpers of its own ("cudnn::fusion::compute_dot_do_o", "convert_dq_to_16bits").
_ATTENTION = re.compile(r"fmha|flash|sdpa|cudnn::fusion|dot_product_attention", re.I)
_CATEGORY_PATTERNS = (
    # conv(?!ert): convolutions ("convolution.3", "cudnn-conv.1"), not dtype converts.
    # nvjet / xmma / cutlass: the kernels of cuBLAS(Lt) that a GPU trace names.
    ("matmul", re.compile(r"gemm|cublas|nvjet|xmma|cutlass|dot|conv(?!ert)|matmul|"
                          r"ynn_fusion|xnn_fusion|onednn", re.I)),
    ("copy", re.compile(r"^(copy|transpose)", re.I)),
    # fused_backward.py's Pallas kernels (backward_kernels=pallas) do elementwise work
    # that XLA's fusions did otherwise.
    ("elementwise", re.compile(r"fusion|layer_norm_modulate_backward|gated_residual_backward",
                               re.I)),
)
# Lines of a trace that carry XLA ops: a GPU's "XLA Ops"; XLA:CPU's worker threads.
_CPU_OP_LINES = re.compile(r"^tf_XLA")
_NOT_OPS = re.compile(r"^(ThreadpoolListener|ThunkExecutor|SlinkyThreadPool|end: )")


def categorise(name, origin=""):
  """Category of one op from its HLO name and where it came from (its JAX operation or
  HLO text: a fused-attention custom call is named only there)."""
  if _ATTENTION.search(f"{name} {origin}"):
    return "attention"
  for category, pattern in _CATEGORY_PATTERNS:
    if pattern.search(name):
      return category
  return "other"


def origins_from_hlo(hlo_text):
  """{HLO instruction name: the JAX op_name of its metadata} of a compiled program's text."""
  return dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"',
                         hlo_text, re.M))


# Where a Flax module's scope starts in an op_name: "jvp(Model)", "Model.encode", "_Net".
# Parts of a remat'd module's op_name that are not modules (nn.remat's scopes); a nested
# "jvp(Model)/Model.encode" repeats the scope and is skipped as well.
_NOT_MODULES = ("checkpoint", "rematted_computation")
_MODULE_SCOPE = re.compile(r"(?:transpose\()?(?:jvp\()?([A-Z_]\w*)\)*(?:\.(\w+))?")


def _origin(origins, name):
  """The JAX op_name of a trace event's op ("" if unknown). A GPU trace names the kernel
  of HLO instruction "loop_add_fusion.3" as "loop_add_fusion_3"."""
  return origins.get(name) or origins.get(re.sub(r"_(\d+)$", r".\1", name), "")


def module_of(op_name):
  """'jit(update)/transpose(jvp(Model))/Model.encode/encoder/block_03/mlp/fc1/dot_general'
  -> 'backward encoder/block_*/mlp/fc1': the pass and the module (two levels below a
  block; blocks taken together). The last part of an op_name is the operation itself and
  parts with parentheses are transformations, so neither names a module. Ops outside the
  model (the optimizer, the loss) are named by their first operation."""
  parts = op_name.split(";")[0].split("/")  # A fusion's op_name lists its ops' by ";".
  for i, part in enumerate(parts):
    scope = _MODULE_SCOPE.fullmatch(part)
    if scope:
      break
  else:
    return f"outside the model: {parts[1] if len(parts) > 1 else op_name}"
  path = parts[i + 1:]
  if scope.group(2):  # "Model.encode": the method.
    path = [scope.group(2)] + path
  elif path and path[0].startswith(scope.group(1) + "."):  # "jvp(Model)/Model.encode".
    path[0] = path[0].split(".", 1)[1]
  # Remat's forward, recomputed inside the backward pass, is named apart.
  direction = ("recomputed" if "rematted_computation" in op_name else
               "backward" if "transpose(" in op_name else "forward")
  modules = []
  for part in path[:-1]:
    part = re.sub(r"_\d+$", "_*", part)
    scope = _MODULE_SCOPE.fullmatch(part)
    if ("(" in part or part in _NOT_MODULES or (scope and scope.group(2))
        or (modules and modules[-1] == part)):  # Dense's "fc1/fc1".
      continue
    modules.append(part)
  if "block_*" in modules:
    i = modules.index("block_*")
    modules = modules[max(i - 1, 0):i + 3]
  return f"{direction} {'/'.join(modules[:4]) or 'model'}"


def _device_planes(profile_data):
  """The trace's accelerator planes (none in a CPU run's trace)."""
  return [p for p in profile_data.planes if p.name.startswith("/device:")]


def _op_events(profile_data):
  """(name, duration_ns, stats) of every XLA op in the trace."""
  planes = list(profile_data.planes)
  device = _device_planes(profile_data)
  events = []
  if device:
    for plane in device:
      lines = list(plane.lines)
      ops = [line for line in lines if line.name == "XLA Ops"]
      # Where XLA runs the step as CUDA graphs (command buffers), the trace has no "XLA
      # Ops" line: the kernels on the GPU's streams are the ops then.
      for line in ops or [line for line in lines if line.name.startswith("Stream")]:
        events.extend(line.events)
  else:
    for plane in planes:
      if plane.name == "/host:CPU":
        for line in plane.lines:
          if _CPU_OP_LINES.match(line.name):
            events.extend(e for e in line.events if not _NOT_OPS.match(e.name))
  result = []
  for e in events:
    try:
      stats = {k: v for k, v in e.stats}
    except (TypeError, ValueError):
      stats = {}
    result.append((e.name, float(e.duration_ns), stats))
  return result


# Measured on a 2-core CPU (docs/BENCHMARKS.md, eleventh session): an Eigen x.T @ dy of
# 15.3 ms wall time had 1.8 ms of op events; a YNNPACK matmul's events cover its time.
CPU_NOTE = ("summed op time. On a CPU, ops on the two threads overlap, so the sum can "
            "exceed the step's wall time, and Eigen's dots (XLA:CPU's weight gradients) "
            "show a fraction of their time: their work runs in thread-pool tasks that the "
            "trace does not attribute to them. Where the wall time goes is measured by "
            "timing the step with a part removed.")


def summarise(profile_data, num_steps, top=25, origins=None):
  """Per-step milliseconds by category, of the `top` most expensive ops and, given
  `origins` ({HLO instruction: JAX op_name}, see origins_from_hlo), by model module
  (every module, costliest first)."""
  origins = origins or {}
  on_cpu = not _device_planes(profile_data)
  by_category = collections.Counter()
  by_op = collections.Counter()
  by_module = collections.defaultdict(collections.Counter)
  by_instance = collections.Counter()
  origin = {}
  for name, ns, stats in _op_events(profile_data):
    tf_op = str(stats.get("tf_op", ""))
    category = categorise(name, f"{tf_op} {str(stats.get('long_name', ''))[:300]}")
    by_category[category] += ns
    # One key for an op's instances ("fusion.3", a GPU's "fusion_3"); a kernel's name
    # without its C++ signature.
    key = re.sub(r"[._]\d+$", "", name.split("(")[0])
    by_op[(category, key)] += ns
    # A GPU kernel of a command buffer has tf_op "XlaModule:", which names no operation.
    op_name = tf_op if "/" in tf_op else _origin(origins, name)
    by_instance[(category, key, name, op_name)] += ns
    if origins:
      by_module[module_of(op_name) if op_name else "unattributed"][category] += ns
  for (category, key, _, op_name), _ in reversed(by_instance.most_common()):
    origin[(category, key)] = op_name  # That of the op's costliest instance.
  per_step = lambda ns: ns / num_steps / 1e6
  total = sum(by_category.values())
  summary = dict(
      op_ms_per_step=per_step(total),
      note=CPU_NOTE if on_cpu else "summed op time",
      by_category_ms={c: per_step(ns) for c, ns in by_category.most_common()},
      top_ops=[dict(category=c, op=op, ms_per_step=per_step(ns), jax_op=origin[(c, op)])
               for (c, op), ns in by_op.most_common(top)])
  if origins:
    modules = sorted(by_module.items(), key=lambda item: -sum(item[1].values()))
    summary["by_module_ms"] = {
        module: dict(total=per_step(sum(cats.values())),
                     **{c: per_step(ns) for c, ns in cats.most_common()})
        for module, cats in modules}
  return summary


def profile(run_steps, state, num_steps, trace_dir=None, hlo_text=None):
  """Runs run_steps(state) under the profiler; returns (its result, summary). Given the
  compiled program's HLO text, the summary also has the op time by model module."""
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="bv_profile_")
  with jax.profiler.trace(trace_dir):
    state = run_steps(state)
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    return state, dict(error=f"no trace written under {trace_dir}")
  summary = summarise(jax.profiler.ProfileData.from_file(paths[-1]), num_steps,
                      origins=origins_from_hlo(hlo_text) if hlo_text else None)
  summary["trace"] = paths[-1]
  return state, summary


def format_summary(summary, top_modules=15):
  """Lines for a terminal."""
  if "error" in summary:
    return [f"profile: {summary['error']}"]
  lines = [f"profile: {summary['op_ms_per_step']:.1f} ms of op time per step: " + ", ".join(
      f"{c} {ms:.1f}" for c, ms in summary["by_category_ms"].items())]
  if summary.get("note") == CPU_NOTE:
    lines.append(f"  note: {CPU_NOTE}")
  for op in summary["top_ops"]:
    lines.append(f"  {op['ms_per_step']:8.2f} ms  {op['category']:<11} {op['op']:<40} "
                 f"{op['jax_op'][-90:]}")
  if "by_module_ms" in summary:
    lines.append("profile by module (op time per step):")
    for module, ms in list(summary["by_module_ms"].items())[:top_modules]:
      parts = ", ".join(f"{c} {v:.1f}" for c, v in ms.items() if c != "total")
      lines.append(f"  {ms['total']:8.2f} ms  {module:<44} {parts}")
  return lines
