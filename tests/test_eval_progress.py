"""Progress lines of long eval loops (fake clock, no sleeping) and run_due's start line."""
import types

import jax
import numpy as np
import pytest

from big_vision import input_pipeline
from big_vision.evaluators import common
from big_vision.evaluators import feature_nets
from big_vision.evaluators import sampling


class FakeClock:
  """Returns the times it is given; `now` is set by the test."""

  def __init__(self, now=0.0):
    self.now = now

  def __call__(self):
    return self.now


def test_progress_lines_counts_rate_and_eta():
  clock, lines = FakeClock(), []
  p = common.Progress("samples uncond", 1000, every=30, log=lines.append, clock=clock,
                      is_main=True)
  for t, n in ((10, 100), (20, 100), (30, 100), (40, 100), (59, 100), (70, 100)):
    clock.now = t
    p.update(n)
  # At t=30: 300 done; 200 images in the 20 s since the first batch (which compiled).
  # At t=70: 600 done, 500 images in 60 s since the first batch: 400 left at 8.33/s.
  assert lines == ["eval: samples uncond 300/1000 img/s 10.0 ETA 00:01:10",
                   "eval: samples uncond 600/1000 img/s 8.3 ETA 00:00:48"]


def test_progress_quick_loop_prints_nothing(capsys, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  clock = FakeClock()
  monkeypatch.setattr(common, "_clock", clock)
  p = common.Progress("x", 10_000)
  for i in range(100):
    clock.now = i * 0.29  # 28.7 s in all: under PROGRESS_EVERY_S.
    p.update(100)
  assert p.done == 10_000 and capsys.readouterr().out == ""
  clock.now = common.PROGRESS_EVERY_S
  p.update(0)  # 9900 images in the 30 s after the first batch.
  assert capsys.readouterr().out == "eval: x 10000/10000 img/s 330.0 ETA 00:00:00\n"


def test_progress_unknown_total_has_no_eta():
  clock, lines = FakeClock(), []
  p = common.Progress("images", every=5, log=lines.append, clock=clock, is_main=True)
  clock.now = 6
  p.update(12)  # The first batch (compiling): no rate yet.
  clock.now = 12
  p.update(12)
  assert lines == ["eval: images 12 img/s ?", "eval: images 24 img/s 2.0"]
  p = common.Progress("known", 100, every=5, log=lines.append, clock=clock, is_main=True)
  clock.now = 20
  p.update(10)
  assert lines[-1] == "eval: known 10/100 img/s ? ETA ?"


@pytest.mark.parametrize("index, expected", [(0, 1), (1, 0), (3, 0)])
def test_progress_only_on_process_zero(monkeypatch, capsys, index, expected):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  clock, lines = FakeClock(), []
  monkeypatch.setattr(common, "_clock", clock)
  for log in (lines.append, None):  # A given log, and the default (print).
    p = common.Progress("x", 100, log=log)
    clock.now += 100
    p.update(50)
  assert len(lines) == expected
  assert len(capsys.readouterr().out.splitlines()) == expected


class _Writer:
  def __init__(self):
    self.written = []

  def write(self, step, metrics):
    self.written.append((step, metrics))

  def flush(self):
    self.written.append("flush")


class _SlowEvaluator:
  """Three batches of 40 images, 20 s each on the fake clock."""

  def __init__(self, clock):
    self.clock = clock

  def run(self, params, step):
    p = common.Progress("test", 120)
    for _ in range(3):
      self.clock.now += 20
      p.update(40)
    yield "loss", 0.5


def test_run_due_logs_start_progress_and_end(monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  clock = FakeClock()
  monkeypatch.setattr(common, "_clock", clock)
  said, writer = [], _Writer()
  scheduled = [common.Scheduled("val", _SlowEvaluator(clock), every=0, use_ema=False)]
  out = common.run_due(scheduled, 7, 7, {"params": None}, writer, said.append)
  assert out["val/loss"] == 0.5 and writer.written[0][0] == 7
  assert writer.written[1] == "flush"  # Each eval's results go up at once (gs:// workdirs).
  # The progress line names the eval and goes to run_due's log, between start and end.
  assert said[0] == "eval val at step 7: started"
  assert said[1] == "eval val: test 80/120 img/s 2.0 ETA 00:00:20"
  assert said[2].startswith("eval val at step 7: loss 0.5") and len(said) == 3
  # Not due: nothing at all.
  said.clear()
  common.run_due(scheduled, 8, 10, {"params": None}, writer, said.append)
  assert said == []


def test_iterate_reports_against_max_examples(monkeypatch):
  """iterate counts valid rows only, and totals min(split size, max_examples)."""
  clock, lines = FakeClock(), []
  monkeypatch.setattr(common, "_clock", clock)
  monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)  # A line at every batch.
  monkeypatch.setattr(common, "_running", {"name": "probe", "log": lines.append})
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  batch = lambda k: {"image": np.zeros((10, 2)), input_pipeline.MASK_KEY: np.arange(10) < k}
  monkeypatch.setattr(input_pipeline, "evaluation", lambda cfg: ("ds", 1000))
  monkeypatch.setattr(input_pipeline, "start_global",
                      lambda ds, sharding, n_prefetch: iter([batch(10)] * 10))
  cfg = dict(data=dict(name="fmnist", split="test"), pp="", batch_size=10)

  def run(max_examples, **kw):
    lines.clear()
    context = types.SimpleNamespace(data_sharding=None)
    for _ in common.iterate(context, cfg, max_examples, **kw):
      clock.now += 1
    return lines
  assert run(25) == ["eval probe: fmnist test 10/25 img/s ? ETA ?",
                     "eval probe: fmnist test 20/25 img/s 10.0 ETA 00:00:00",
                     "eval probe: fmnist test 25/25 img/s 7.5 ETA 00:00:00"]  # Trimmed.
  assert run(None, what="features")[-1] == (
      "eval probe: features 100/1000 img/s 10.0 ETA 00:01:30")
  monkeypatch.setattr(input_pipeline, "start_global",
                      lambda ds, sharding, n_prefetch: iter([batch(10), batch(3), batch(0)]))
  assert [l.split()[4] for l in run(None)] == ["10/1000", "13/1000", "13/1000"]


def test_sampling_and_feature_net_loops_report(monkeypatch):
  clock, lines = FakeClock(), []
  monkeypatch.setattr(common, "_clock", clock)
  monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)
  monkeypatch.setattr(common, "_running", {"name": "gen", "log": lines.append})
  monkeypatch.setattr(jax, "process_index", lambda: 0)

  def generate(params, rng, first_id, scale, conditional):
    del params, rng, first_id, scale, conditional
    clock.now += 2
    return np.zeros((10, 2, 2, 1))
  ev = object.__new__(sampling.Evaluator)
  ev.num_samples, ev.batch_size, ev.seed, ev.num_classes = 25, 10, 0, 0
  ev._generate = generate
  assert ev.samples(None).shape == (25, 2, 2, 1)
  assert [l.split(" img/s")[0] for l in lines] == [
      f"eval gen: samples uncond {k}/25" for k in (10, 20, 25)]
  assert lines[1].endswith("img/s 5.0 ETA 00:00:01")

  lines.clear()
  net = feature_nets.FeatureNet("toy", "w", lambda x: (x[:, :3], x[:, :2]))
  feats, _ = net(np.ones((600, 4)))
  assert feats.shape == (600, 3)
  assert [l.split()[4] for l in lines] == ["250/600", "500/600", "600/600"]
