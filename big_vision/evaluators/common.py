"""Builds evaluators from `config.evals` and runs them when due.

`config.evals` maps a name to a spec:
  type:        module in big_vision/evaluators/ (fewshot, diffusion_loss, reconstruction,
               sampling, inpainting)
  every_steps / every_epochs: how often (also run at the end of training)
  use_ema:     evaluate the EMA parameters when the run keeps them (default True)
  data, pp, batch_size: its own data (default: the training dataset's eval split)
  ...:         the evaluator's own options (another name is a config error listing them).
Each evaluator is `Evaluator(context, **options)` with `run(params, step)` yielding
(metric name, value); names are prefixed with the eval's name in metrics.jsonl, and its
images are named after it too (context.name; see image_path).

Long loops inside evaluators report their progress with `Progress` (at most one line every
PROGRESS_EVERY_S seconds, on process 0 only), through the log given to `run_due`.
"""
import contextlib
import dataclasses
import importlib
import inspect
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from big_vision import input_pipeline
from big_vision import metric_writer
from big_vision.config_parsing import ConfigError

TYPES = ("fewshot", "diffusion_loss", "reconstruction", "sampling", "inpainting")
_FRAMEWORK_KEYS = ("type", "every_steps", "every_epochs", "use_ema")
PROGRESS_EVERY_S = 30.0  # Seconds between progress lines of a long eval loop.
_clock = time.monotonic  # Progress's clock (tests replace it).

# The eval `run_due` is running now and its log: progress lines name it and go where its
# start and end lines go. Outside run_due (an evaluator run directly): "eval", print.
_running = {"name": None, "log": None}


@contextlib.contextmanager
def _reporting(name, log):
  saved = dict(_running)
  _running.update(name=name, log=log)
  try:
    yield
  finally:
    _running.update(saved)


def _print(text):
  print(text, flush=True)


class Progress:
  """Progress of a long eval loop: `update(n)` after every n images done.

  Logs `eval NAME: WHAT k/N img/s R ETA HH:MM:SS` (as the training log's lines; just
  `WHAT k img/s R` when the total is unknown) when `every` seconds (PROGRESS_EVERY_S)
  passed since the loop's start or its last line, so quick loops log nothing; only on
  process 0 (every process runs the same loop). img/s is measured from the first update
  on, leaving out the first batch (which compiles): `img/s ? ETA ?` until a second one.
  """

  def __init__(self, what, total=None, *, every=None, log=None, clock=None, is_main=None):
    self.what, self.total = what, (int(total) if total else None)
    self.every = PROGRESS_EVERY_S if every is None else float(every)
    self.name = _running["name"] or ""
    self.log = log or _running["log"] or _print
    self.is_main = jax.process_index() == 0 if is_main is None else bool(is_main)
    self.clock = clock or _clock
    self.done = 0
    self._start = self._last = self.clock()
    self._first = None  # (time, done) at the first update: the rate is measured from it.

  def update(self, n):
    """Counts n more images done; logs a line when `every` seconds passed since the last."""
    self.done += int(n)
    now = self.clock()
    if self._first is None:
      self._first = (now, self.done)
    if now - self._last < self.every:
      return
    self._last = now
    if self.is_main:
      self.log(self.line(now))

  def rate(self, now):
    """Images per second since the first update; None before any images after it."""
    if self._first is None or self.done <= self._first[1] or now <= self._first[0]:
      return None
    return (self.done - self._first[1]) / (now - self._first[0])

  def line(self, now):
    rate = self.rate(now)
    text = f"eval {self.name}: " if self.name else "eval: "
    text += f"{self.what} {self.done}"
    if self.total:
      text += f"/{self.total}"
    text += f" img/s {rate:.1f}" if rate else " img/s ?"
    if self.total:
      left = metric_writer.duration(max(self.total - self.done, 0) / rate) if rate else "?"
      text += f" ETA {left}"
    return text


@dataclasses.dataclass
class Context:
  """What every evaluator may use: the model and its diffusion, the run's config."""
  model: Any
  diffusion: Any
  config: Any
  workdir: str
  mesh: Any
  data_sharding: Any
  name: str = ""  # The eval's name in config.evals (build sets it): names its images.

  @property
  def is_main(self):
    return jax.process_index() == 0


@dataclasses.dataclass
class Scheduled:
  name: str
  evaluator: Any
  every: int  # Steps; 0 means only at the end.
  use_ema: bool


def build(config, context, num_train, batch_size, log=print):
  """[Scheduled] for every entry of config.evals; unknown types fail with the list.

  An evaluator that cannot run here (a missing weights file or dataset) is left out with
  one line saying why, so that the training itself still runs; one that only lacks its
  FID/IS network's weights runs without FID/IS (sample grids, inpainting MSE), also said.
  """
  result = []
  for name, spec in (config.get("evals") or {}).items():
    spec = dict(spec)
    kind = spec.get("type")
    if kind not in TYPES:
      raise ConfigError(f"evals.{name}: unknown type {kind!r}; known: {', '.join(TYPES)}")
    every = 0  # Only at the end.
    if spec.get("every_steps"):
      every = int(spec["every_steps"])
    elif spec.get("every_epochs"):
      every = max(1, int(math.ceil(spec["every_epochs"] * num_train / batch_size)))
    module = importlib.import_module(f"big_vision.evaluators.{kind}")
    options = {k: v for k, v in spec.items() if k not in _FRAMEWORK_KEYS}
    allowed = [k for k in inspect.signature(module.Evaluator).parameters if k != "context"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:  # Else a TypeError traceback from the constructor.
      raise ConfigError(f"evals.{name}: unknown option {unknown[0]!r} for type {kind!r}; "
                        f"allowed: {', '.join(sorted([*allowed, *_FRAMEWORK_KEYS]))}")
    evaluator, missing, bad = None, None, None
    try:
      evaluator = module.Evaluator(dataclasses.replace(context, name=name), **options)
    except FileNotFoundError as e:
      missing = e
    except ValueError as e:  # A bad option, or a bad weights file: stops the run below.
      bad = e
    # Every process runs the same evals (their data loops are collective): a file missing
    # on one host skips the eval on all of them. The vote comes first, so that a host whose
    # eval fails does not leave the others waiting in it.
    everywhere = on_every_process(missing is None and bad is None)
    if bad is not None:
      raise ConfigError(f"evals.{name}: {bad}") from bad
    if not everywhere:
      log(f"eval {name} skipped: {missing or 'a file it needs is missing on another host'}")
      continue
    # Without its feature network's weights, an eval that also scores FID/IS runs without
    # them (on every host alike: scoring is collective), if it has anything else to do.
    unscored = getattr(evaluator, "unscored", None)
    if not on_every_process(unscored is None):
      why = unscored or "the feature network's weights are missing on another host"
      if not evaluator.drop_scorer():
        log(f"eval {name} skipped: {why}")
        continue
      log(f"eval {name} without FID/IS: {why}")
    result.append(Scheduled(name, evaluator, every, spec.get("use_ema", True)))
  return result


def run_due(scheduled, step, total_steps, state, writer, log, force=False):
  """Runs the evaluators due at `step` (all of them at the end or when forced).

  Writes each evaluator's results with `writer` and returns them all as one dict.
  """
  everything = {}
  for s in scheduled:
    due = force or step == total_steps or (s.every and step % s.every == 0)
    if not due:
      continue
    params = state["ema_params"] if s.use_ema and "ema_params" in state else state["params"]
    log(f"eval {s.name} at step {step}: started")
    start = time.time()
    with _reporting(s.name, log):
      results = {f"{s.name}/{k}": v for k, v in s.evaluator.run(params, step)}
    results[f"{s.name}/seconds"] = time.time() - start
    writer.write(step, results)
    writer.flush()  # A remote metrics.jsonl: results are rare and costly, upload each now.
    everything.update(results)
    log(f"eval {s.name} at step {step}: " + ", ".join(
        f"{k.split('/', 1)[1]} {v:.4g}" for k, v in results.items()
        if isinstance(v, float)))
  return everything


def eval_input_config(context, data=None, pp=None, batch_size=None, split=None):
  """The eval data config: the training dataset's eval split unless given (its data_dir
  and builder arguments, e.g. source_dir, too)."""
  cfg = context.config
  data = dict(data or {})
  if not data.get("name"):
    data["name"] = cfg.input.data.name
    data.setdefault("data_dir", cfg.input.data.get("data_dir"))
    for k, v in input_pipeline.builder_kwargs(cfg.input.data).items():
      data.setdefault(k, v)
  data["split"] = split or data.get("split") or cfg.get("eval_split", "test")
  # Exists? (Not prepared here: that is collective, and evaluators are built per process.)
  input_pipeline.dataset_builder(data, prepare=False)
  n = context.mesh.devices.size  # Eval batches are sharded over every device.
  if not batch_size:
    batch_size = device_multiple(context, min(cfg.input.batch_size, 256))
  elif int(batch_size) % n:
    raise ConfigError(f"eval batch_size={batch_size} is not divisible by the {n} devices "
                      f"the eval batches are sharded over; use a multiple of {n}")
  return dict(data=data, pp=pp or cfg.get("pp_eval") or cfg.input.pp,
              batch_size=int(batch_size))


def image_path(context, stem, step):
  """workdir/images/{stem}_{step}.png; evaluators take the stem from the eval's name
  (context.name), so two evals of one type keep their own pictures."""
  return os.path.join(context.workdir, "images", f"{stem}_{step:07d}.png")


def device_multiple(context, batch_size):
  """batch_size rounded up to a multiple of the devices (for the evaluators' own sizes)."""
  n = context.mesh.devices.size
  return -(-int(batch_size) // n) * n


def iterate(context, input_config, max_examples=None, what=None):
  """Yields global eval batches (padded, with input_pipeline.MASK_KEY) until done.

  Reports its progress (`what`: the split unless given) against the split's size, or
  max_examples when fewer.
  """
  ds, total = input_pipeline.evaluation(ml_collections.ConfigDict(input_config))
  if max_examples:
    total = min(total, max_examples) if total else max_examples
  data = input_config["data"]
  progress = Progress(what or f"{data['name']} {data['split']}", total)
  seen = 0
  for batch in input_pipeline.start_global(ds, context.data_sharding, n_prefetch=0):
    # Every process's rows: the mask is a global array, not fetchable whole on one host.
    n = int(gather(batch[input_pipeline.MASK_KEY]).sum())
    if max_examples and seen + n > max_examples:  # Rows past max_examples count as padding.
      n = max_examples - seen
      batch = dict(batch, **{input_pipeline.MASK_KEY: _keep_first(
          batch[input_pipeline.MASK_KEY], n)})
    yield batch
    seen += n
    progress.update(n)
    if max_examples and seen >= max_examples:
      return


@jax.jit
def _keep_first(mask, n):
  """The mask with only its first n True rows left True (in the global batch's order)."""
  valid = mask.astype(jnp.int32)
  return (valid * (jnp.cumsum(valid) <= n)).astype(mask.dtype)


def gather(x):
  """A global array -> numpy on every host (all processes' rows)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def on_every_process(flag):
  """True where every process says True (collective: call it on all processes)."""
  if jax.process_count() > 1:
    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))
  return bool(flag)


def collect(context, input_config, fn, max_examples=None, what=None):
  """Runs fn(batch) -> dict of [B, ...] arrays over eval data; returns numpy, unpadded."""
  parts = {}
  for batch in iterate(context, input_config, max_examples, what):
    out = fn(batch)
    valid = gather(batch[input_pipeline.MASK_KEY]).astype(bool)
    for k, v in out.items():
      parts.setdefault(k, []).append(gather(v)[valid])
  return {k: np.concatenate(v) for k, v in parts.items()}
