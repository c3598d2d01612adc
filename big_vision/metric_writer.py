"""Where training metrics go: metrics.jsonl, wandb (offline unless asked) and the log."""
import json
import os
import re
import time
import uuid

from big_vision import fileio


class MetricWriter:
  """Appends one JSON object per logged step; mirrors to wandb on the main process.

  A remote workdir (gs://...) cannot be appended to: its records are kept here and the
  whole metrics.jsonl is rewritten, at most every `upload_seconds` (late in a long run it
  is megabytes) and at each flush(): the trainer flushes before checkpoints, pictures and
  the end, so the file always holds what a resumed run would keep.
  """

  def __init__(self, workdir, config, is_main=True, resume_step=None, upload_seconds=60.0,
               clock=time.monotonic):
    self.is_main = is_main
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._wandb = None
    self._lines = None  # The remote file's lines; None for a local file (appended to).
    self._upload_seconds, self._clock = upload_seconds, clock
    self._uploaded_at, self._pending = clock(), False
    if not is_main:
      return
    if fileio.is_remote(workdir):
      self._lines = (fileio.read_text(self.path).splitlines(keepends=True)
                     if fileio.exists(self.path) else [])
    if resume_step is not None:
      self._drop_after(resume_step)
    mode = config.get("wandb", {}).get("mode", "offline")
    if mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb = wandb.init(
          mode=mode, dir=_wandb_dir(workdir),
          project=config.wandb.get("project", "masked-diffusion-ae"),
          config=config.to_dict(), resume="allow",
          id=config.wandb.get("id") or _run_id(workdir))

  def write(self, step, metrics):
    if not self.is_main:
      return
    record = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    if self._lines is None:
      with open(self.path, "a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      self._pending = True
      if self._clock() - self._uploaded_at >= self._upload_seconds:
        self.flush()
    if self._wandb is not None:
      self._wandb.log(record, step=int(step))

  def flush(self):
    """Uploads a remote metrics.jsonl if records are waiting (a local file is current)."""
    if self._lines is not None and self._pending:
      fileio.write_text(self.path, "".join(self._lines))
      self._uploaded_at, self._pending = self._clock(), False

  def _drop_after(self, step):
    """Forgets the records of steps after `step`: a run resumed from that checkpoint logs
    them again, and the interrupted run's ones belong to a discarded history."""
    if self._lines is not None:
      lines = self._lines
    elif not os.path.exists(self.path):
      return
    else:
      with open(self.path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if int(json.loads(line)["step"]) > step:
          continue
      except (ValueError, KeyError, TypeError):
        pass  # Not ours to judge: keep it.
      kept.append(line)
    if len(kept) == len(lines):
      return
    if self._lines is not None:  # An object is replaced whole anyway.
      self._lines = kept
      fileio.write_text(self.path, "".join(kept))
    else:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def close(self):
    self.flush()
    if self._wandb is not None:
      self._wandb.finish()


def _py(value):
  """Plain floats for JSON; None for missing or non-finite values (JSON has no NaN)."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return value
  return value if value == value and abs(value) != float("inf") else None


def _run_id(workdir):
  """A stable wandb id per workdir, so a resumed run continues the same wandb run."""
  path = os.path.join(workdir, "wandb_id.txt")
  if fileio.exists(path):
    return fileio.read_text(path).strip()
  run_id = f"run-{uuid.uuid4().hex[:12]}"  # Not the time: sweeps start runs in one second.
  fileio.write_text(path, run_id)
  return run_id


def _wandb_dir(workdir):
  """The workdir, or for a remote one (wandb writes local files only) a local folder named
  after it under ~/.cache/big_vision/wandb, where `wandb sync` finds offline runs later."""
  if not fileio.is_remote(workdir):
    return workdir
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", fileio.absolute(workdir))
  path = os.path.join(os.path.expanduser("~"), ".cache", "big_vision", "wandb", name)
  os.makedirs(path, exist_ok=True)
  log(f"wandb files of {workdir} go to the local {path}")
  return path


class Progress:
  """One log line per interval: step, loss, learning rate, img/s and ETA."""

  def __init__(self, total_steps, batch_size, first_step):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_time = None
    self._last_step = first_step

  def measure(self, step):
    """Images per second since the last call (None at the first call, which compiles)."""
    now = time.time()
    rate = None
    if self._last_time is not None and step > self._last_step:
      rate = (step - self._last_step) * self.batch_size / (now - self._last_time)
    self._last_time, self._last_step = now, step
    return rate

  def restart(self, step):
    """Starts the next interval now, so time spent on evals does not count as training.
    Before the first measured step (evals run on resuming) it does nothing: that step
    compiles, so it has no rate."""
    if self._last_time is not None:
      self._last_time, self._last_step = time.time(), step

  def line(self, step, metrics, rate):
    eta = "?"
    if rate:
      seconds = (self.total_steps - step) * self.batch_size / rate
      eta = duration(seconds)
    img_s = f"{rate:.1f}" if rate else "(compiling)"
    text = f"step {step}/{self.total_steps} loss {metrics['loss']:.4f}"
    for key in ("loss_clean", "loss_noised"):
      if key in metrics:
        text += f" {key.split('_')[1]} {metrics[key]:.4f}"
    return text + f" lr {metrics['lr']:.2e} img/s {img_s} ETA {eta}"


def duration(seconds):
  """'HH:MM:SS', with 'Nd ' in front past a day (time.strftime would wrap at 24 h)."""
  days, rest = divmod(int(round(seconds)), 86400)
  text = time.strftime("%H:%M:%S", time.gmtime(rest))
  return f"{days}d {text}" if days else text


def log(text):
  print(text, flush=True)
