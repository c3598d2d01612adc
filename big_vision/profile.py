"""Where a compiled step spends its device time: a jax.profiler trace, summarised.

  state, summary = profile(run_steps, state, num_steps)

runs `run_steps(state)` (which must block until its steps are done) under
`jax.profiler.trace`, reads the trace back with `jax.profiler.ProfileData` and sums the
time of every XLA op, per step: on a GPU the ops of the device's "XLA Ops" line, on a CPU
those of XLA's worker threads. Ops are put in categories by their HLO name and the JAX
operation they came from (the `tf_op` stat, e.g. ".../attn/qkv/dot_general"):

  matmul       dots, cuBLAS / Triton GEMMs, convolutions
  attention    fused attention kernels (cuDNN's flash attention)
  elementwise  every other fusion (norms, activations, residual adds, the optimizer)
  copy         copies and transposes outside fusions
  other        the rest (random numbers, sorts, gathers, reductions outside fusions)
"""
import collections
import glob
import os
import re
import tempfile

import jax

_ATTENTION = re.compile(r"fmha|flash|dot_product_attention", re.I)
_CATEGORY_PATTERNS = (
    ("matmul", re.compile(r"gemm|cublas|dot|conv|matmul|ynn_fusion|xnn_fusion|onednn",
                          re.I)),
    ("copy", re.compile(r"^(copy|transpose)", re.I)),
    ("elementwise", re.compile(r"fusion", re.I)),
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


def _op_events(profile_data):
  """(name, duration_ns, stats) of every XLA op in the trace."""
  planes = list(profile_data.planes)
  device = [p for p in planes if p.name.startswith("/device:")]
  events = []
  if device:
    for plane in device:
      for line in plane.lines:
        if line.name == "XLA Ops":
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


def summarise(profile_data, num_steps, top=25):
  """Per-step milliseconds by category and of the `top` most expensive ops."""
  by_category = collections.Counter()
  by_op = collections.Counter()
  origin = {}
  for name, ns, stats in _op_events(profile_data):
    tf_op = str(stats.get("tf_op", ""))
    category = categorise(name, f"{tf_op} {str(stats.get('long_name', ''))[:300]}")
    by_category[category] += ns
    key = re.sub(r"\.\d+$", "", name)
    by_op[(category, key)] += ns
    origin.setdefault((category, key), tf_op)
  per_step = lambda ns: ns / num_steps / 1e6
  total = sum(by_category.values())
  return dict(
      op_ms_per_step=per_step(total),
      note="summed op time; on a CPU ops of the two threads overlap, so it can exceed "
           "the step's wall time",
      by_category_ms={c: per_step(ns) for c, ns in by_category.most_common()},
      top_ops=[dict(category=c, op=op, ms_per_step=per_step(ns), jax_op=origin[(c, op)])
               for (c, op), ns in by_op.most_common(top)])


def profile(run_steps, state, num_steps, trace_dir=None):
  """Runs run_steps(state) under the profiler; returns (its result, summary)."""
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="bv_profile_")
  with jax.profiler.trace(trace_dir):
    state = run_steps(state)
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    return state, dict(error=f"no trace written under {trace_dir}")
  summary = summarise(jax.profiler.ProfileData.from_file(paths[-1]), num_steps)
  summary["trace"] = paths[-1]
  return state, summary


def format_summary(summary):
  """Lines for a terminal."""
  if "error" in summary:
    return [f"profile: {summary['error']}"]
  lines = [f"profile: {summary['op_ms_per_step']:.1f} ms of op time per step: " + ", ".join(
      f"{c} {ms:.1f}" for c, ms in summary["by_category_ms"].items())]
  for op in summary["top_ops"]:
    lines.append(f"  {op['ms_per_step']:8.2f} ms  {op['category']:<11} {op['op']:<40} "
                 f"{op['jax_op'][-90:]}")
  return lines
