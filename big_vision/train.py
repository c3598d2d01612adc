r"""Trains the masked-diffusion auto-encoder: UMD, MAE, DiT, MaskDiT, MaskDM or DiffMAE, as
the config says.

  python -m big_vision.train --config configs/ae_fmnist.py:method=umd --workdir DIR

Reads top to bottom: config -> data -> model -> optimizer -> shardings -> state
(fresh, resumed or init_from) -> loop (log, checkpoint, pictures) -> final save.
Running again on the same workdir resumes from its last checkpoint. The step itself
(state init and the update function) is built in train_step.py.
"""
import functools
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from big_vision import checkpointing
from big_vision import config_cli
from big_vision import diffusion as diffusion_lib
from big_vision import distributed
from big_vision import fileio
from big_vision import host_allocator
from big_vision import input_pipeline
from big_vision import methods
from big_vision import metric_writer
from big_vision import optimizer as optimizer_lib
from big_vision import reconstruct
from big_vision import sharding
from big_vision import steps as steps_lib
from big_vision import train_step
from big_vision import visualize
from big_vision.evaluators import common as eval_common
from big_vision.config_parsing import ConfigError
from big_vision.config_parsing import check_int
from big_vision.models import ae


def check_trainable(config):
  """Checks beyond the model that only the trainer cares about; before any work."""
  methods.check_config(config)
  if config.get("latent_diffusion"):
    raise ConfigError("latent_diffusion=True needs a VAE encoder loaded from "
                      "config.vae.weights; this trainer trains in pixel space only so far")
  if not config.get("total_steps") and not config.get("total_epochs"):
    raise ConfigError("set the run's length: total_steps=N or epochs=E in the config string")
  # A negative length would train nothing and still report "done"; a warmup share beyond
  # [0, 1] would never reach the peak learning rate.
  steps_lib.check(config, "total")
  steps_lib.check(config, "warmup")
  for key in ("log_training_steps", "ckpt_steps", "image_steps"):  # Used as step % value.
    value = config.get(key)
    if value is not None:
      check_int(key, value, 1, " (steps between two of them)")


def save_config(config, workdir):
  fileio.write_text(os.path.join(workdir, "config.json"),
                    config.to_json_best_effort(indent=2, sort_keys=True))


def _trained_diffusion(config):
  """The noise levels the model learns: another schedule or T cannot continue a run."""
  return dict(schedule=config.diffusion.schedule, timesteps=config.diffusion.timesteps)


def _checkpoint_extra(step, batch_size, config):
  """What a checkpoint records besides the state (the `extra` of checkpointing.py): the
  data stream's position and the diffusion the model was trained with."""
  return dict(step=step, examples_seen=step * batch_size, process_count=jax.process_count(),
              diffusion=_trained_diffusion(config))


def _check_resume(ckpt, step, batch_size, config, workdir, log):
  """Resuming skips `step` batches of this batch size, each process of its own shard,
  and goes on with the diffusion of the checkpoint."""
  extra = ckpt.extra(step) or {}
  saved, now = extra.get("diffusion"), _trained_diffusion(config)
  if saved is not None and saved != now:  # Same shapes: the restore would not notice.
    ckpt.close()
    raise ConfigError(
        f"diffusion {now}, but the checkpoint of step {step} in {workdir} was trained "
        f"with {saved}; resume with that diffusion, or start a new workdir (init_from=... "
        "to keep the parameters)")
  seen = extra.get("examples_seen")
  if seen is not None and seen != step * batch_size:  # Would repeat or skip data.
    ckpt.close()  # An orbax manager left open keeps its threads.
    raise ConfigError(
        f"batch_size={batch_size}, but the checkpoint of step {step} in {workdir} "
        f"was trained with batch_size={seen // step} ({seen} examples seen); "
        "resume with that batch size, or start a new workdir (init_from=... to keep "
        "the parameters)")
  saved, now = extra.get("process_count"), jax.process_count()
  if saved is not None and saved != now:  # The state restores; the data split differs.
    log(f"WARNING: the checkpoint of step {step} was trained on {saved} processes and this "
        f"run has {now}: each process now reads 1/{now} of the data, so the rest of the "
        "current epoch repeats some images and misses others (later epochs are whole). "
        f"Resume on {saved} processes to continue the same data stream.")


def _first_images(config, n, data_sharding, replicated):
  """The first n images of the training stream without its shuffle buffer (files are
  still read in the seed's order): the same in every run of a config, on every process."""
  input_config = config.input.copy_and_resolve_references()
  input_config.shuffle_buffer_size, input_config.cache_raw = 0, False
  input_config.prefetch = 1
  dataset, _ = input_pipeline.training(input_config, seed=config.seed)
  batch = next(input_pipeline.start_global(dataset, data_sharding, n_prefetch=0))
  first = eval_common.gather(batch["image"])[:n]
  return jax.make_array_from_callback(first.shape, replicated, lambda i: first[i])


def _flat(tree, prefix=""):
  """{dotted key: value} of a JSON tree."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
  return out


def _config_changes(config, workdir):
  """What a resumed run changes in the config.json of the run it continues, as
  ["name=old -> new", ...]. Options that an older config.json lacks are not changes."""
  path = os.path.join(workdir, "config.json")
  if not fileio.exists(path):
    return []
  saved = _flat(json.loads(fileio.read_text(path)))
  now = _flat(json.loads(config.to_json_best_effort()))
  return [f"{k}={saved[k]!r} -> {now[k]!r}" for k in sorted(set(saved) & set(now))
          if saved[k] != now[k]]


def _save_resumed_config(config, workdir, start_step, changes, log):
  """config.json is the config of the run's latest steps. A resume that changes it keeps
  the earlier one as config_until_step_N.json (what trained steps up to N); one that
  trains nothing more leaves it as it is."""
  path = os.path.join(workdir, "config.json")
  if not changes:
    return
  earlier = os.path.join(workdir, f"config_until_step_{start_step}.json")
  if not fileio.exists(earlier):
    fileio.write_text(earlier, fileio.read_text(path))
  save_config(config, workdir)
  log(f"config.json: this run's config; the one that trained steps up to {start_step} is "
      f"now {os.path.basename(earlier)}")


def _check_classes(config):
  """A class-conditional model needs an embedding row for every label of the dataset:
  label num_classes is the null class, and beyond it the lookup reads garbage (nan)."""
  model_classes = config.model.get("num_classes") or 0
  if not model_classes:
    return
  classes = input_pipeline.num_classes(config.input.data)
  if classes is not None and classes > model_classes:
    raise ConfigError(f"dataset {config.input.data.name!r} has {classes} classes but "
                      f"model.num_classes={model_classes}; set it to {classes}")


def _interval_means(steps_metrics):
  """One record for the steps since the last: the mean of each metric over them (a
  single batch's loss, at a random t, is noisy), and the learning rate of the last."""
  means = {k: float(np.mean([m[k] for m in steps_metrics])) for k in steps_metrics[-1]}
  if "lr" in means:
    means["lr"] = float(steps_metrics[-1]["lr"])
  return means


def _missing_at(evals, workdir, step):
  """The evals without results at `step` in metrics.jsonl. Process 0 reads it (another
  host may have no copy of a local workdir) and tells the others: their loops are
  collective, so all must run the same evals."""
  path = os.path.join(workdir, "metrics.jsonl")
  missing = np.ones(len(evals), bool)
  if jax.process_index() == 0 and fileio.exists(path):
    done = {k for r in visualize.read_metrics(path) if r.get("step") == step for k in r}
    missing = np.array([f"{e.name}/seconds" not in done for e in evals], bool)
  if jax.process_count() > 1:
    missing = multihost_utils.broadcast_one_to_all(missing)
  return [e for e, m in zip(evals, missing) if m]


def train(config, workdir):
  """Runs (or resumes) one training run in `workdir`. Returns (state, last metrics)."""
  is_main = jax.process_index() == 0
  log = metric_writer.log if is_main else (lambda *_: None)

  # Data: each process reads its own shard and batch_size // process_count per step.
  mesh = sharding.make_mesh()
  batch_size = config.input.batch_size
  sharding.check_batch(batch_size, mesh)
  _check_classes(config)
  fileio.makedirs(workdir)  # A local folder or a URL (gs://bucket/run), see fileio.py.
  ckpt = checkpointing.Checkpointer(workdir)
  resume_step = ckpt.latest_step()
  changes = []
  if resume_step is not None:
    _check_resume(ckpt, resume_step, batch_size, config, workdir, log)
    changes = _config_changes(config, workdir)
  train_ds, num_train = input_pipeline.training(config.input, seed=config.seed,
                                                skip_batches=resume_step or 0)
  total_steps = steps_lib.resolve(config, "total", num_train, batch_size)
  warmup_steps = steps_lib.resolve(config, "warmup", num_train, batch_size, default=0)
  log(f"{num_train} training images, batch {batch_size} on {mesh.devices.size} devices, "
      f"{total_steps} steps ({total_steps * batch_size / num_train:.2f} epochs)")

  # Model and diffusion.
  model = ae.build_model(config.model)
  apply = train_step.make_apply(model)
  diffusion = diffusion_lib.GaussianDiffusion.create(config.diffusion.schedule,
                                                     config.diffusion.timesteps)

  # Optimizer and shardings of the whole train state.
  init_params = train_step.make_init_params(model)
  abstract_params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx, lr_fn = optimizer_lib.make(config, abstract_params, total_steps, warmup_steps)
  use_ema = bool(config.get("ema_decay"))
  init_state = train_step.make_init_state(config, init_params, tx)
  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_shardings = sharding.tree_shardings(abstract_state, mesh, config.param_sharding)
  repl, data_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  log(f"model {config.model.variant}: {ae.count_params(abstract_params) / 1e6:.2f}M params")

  # State: resume from this workdir, else init (optionally from another run).
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  start_step = resume_step
  if start_step is not None:
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, state_shardings)
    differences = ckpt.differences(start_step, abstract_state)
    if differences:
      ckpt.close()
      changed = (f"config.json's {'; '.join(changes)}" if changes else
                 "model, EMA or optimizer changed?")
      raise ConfigError(
          f"cannot resume: the checkpoint of step {start_step} in {workdir} holds another "
          f"train state ({changed}): {'; '.join(differences[:3])}; resume with the run's "
          "config (config.json), or start a new workdir (init_from=... to keep the "
          "parameters)")
    if changes:  # The run goes on, but no longer equals an uninterrupted one.
      log(f"WARNING: resuming {workdir} with a changed config: {'; '.join(changes)}")
    state, extra = ckpt.restore(start_step, target)
    log(f"resumed from step {start_step} ({extra})")
  else:
    start_step = 0
    state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)
    if config.get("init_from"):
      params, fresh, unused = checkpointing.merge_params(
          state["params"], checkpointing.load_params(config.init_from)[0]["params"])
      if unused:  # Another variant, patch or image size: its weights would be dropped.
        raise ConfigError(
            f"init_from={config.init_from}: {len(unused)} of its arrays fit nowhere in "
            f"this model (path or shape differ), e.g. {', '.join(unused[:3])}; this model "
            f"has them fresh: {', '.join(fresh[:3]) or 'none'}")
      state = dict(state, params=params, opt_state=jax.jit(
          tx.init, out_shardings=state_shardings["opt_state"])(params))
      if use_ema:  # A copy: the step donates the state, and one buffer cannot go twice.
        state["ema_params"] = jax.tree_util.tree_map(lambda p: p.copy(), params)
      log(f"initialised from {config.init_from}; fresh: {fresh or 'nothing'}")

  # Only now: a refused resume or init_from leaves the run's own config.json.
  if is_main and resume_step is None:
    save_config(config, workdir)
  elif is_main and start_step < total_steps:
    _save_resumed_config(config, workdir, start_step, changes, log)

  # The update step: one jit-compiled program with explicit shardings.
  update = train_step.make_update(config, model, diffusion, tx, lr_fn, rng, batch_size,
                                  mesh.devices.size, data_sharding)
  update = jax.jit(update, in_shardings=(state_shardings, data_sharding),
                   out_shardings=(state_shardings, repl), donate_argnums=(0,))

  # Pictures of reconstructions of a fixed set of training images: the first ones of the
  # config's unshuffled stream (the run's own batches would change with each resume).
  vis_images = _first_images(config, min(8, batch_size), data_sharding, repl)

  @functools.partial(jax.jit, static_argnames=("mask_ratio", "t"))
  def predict_recon(params, images, rng, mask_ratio, t):
    return reconstruct.reconstruct(apply, params, images, rng, mask_ratio=mask_ratio,
                                   grid=model.grid, patch_size=model.patch_size, t=t,
                                   diffusion=diffusion,
                                   noised_queries=methods.is_diffmae(config))

  def write_pictures(step, params, vis_images):
    # Every process computes (the arrays span all of them); only the main one writes.
    rows, names = [vis_images], ["original"]
    if config.no_noise_prob > 0:
      r = predict_recon(params, vis_images, jax.random.PRNGKey(1),
                        config.mask_ratio_no_noise, None)
      rows += [r["input"], r["reconstruction"]]
      names += [f"clean input, {config.mask_ratio_no_noise:.0%} masked", "reconstruction"]
    if config.no_noise_prob < 1:
      t = diffusion.num_timesteps // 4
      r = predict_recon(params, vis_images, jax.random.PRNGKey(2), config.mask_ratio, t)
      prediction, name = r["prediction"], "x0 prediction"
      if config.mask_ratio > 0 and not methods.learnt_mask_ratio(config):  # MaskDM.
        prediction, name = jnp.where(r["mask"] > 0, 0.0, prediction), "x0 of visible patches"
      rows += [r["input"], prediction]
      noised = "masked patches noised" if methods.is_diffmae(config) else "noised"
      names += [f"{noised} t={t}, {config.mask_ratio:.0%} masked", name]
    rows = [eval_common.gather(r) for r in rows]
    if not is_main:
      return
    path = os.path.join(workdir, "images", f"reconstruction_{step:07d}.png")
    visualize.image_grid(rows, path, row_names=names)
    if fileio.exists(os.path.join(workdir, "metrics.jsonl")):
      visualize.loss_curve(os.path.join(workdir, "metrics.jsonl"),
                           os.path.join(workdir, "loss_curve.png"))

  # Evaluators (config.evals), run at their intervals and at the end.
  evals = eval_common.build(config, eval_common.Context(
      model=model, diffusion=diffusion, config=config, workdir=workdir, mesh=mesh,
      data_sharding=data_sharding), num_train, batch_size, log=log)

  # The loop. The data iterator skips the batches earlier runs consumed.
  # A fresh start forgets the records of a run that died before its first checkpoint.
  writer = metric_writer.MetricWriter(workdir, config, is_main=is_main,
                                      resume_step=resume_step or 0)
  batches = input_pipeline.start_global(
      train_ds, data_sharding, n_prefetch=config.input.get("prefetch_to_device", 2))
  progress = metric_writer.Progress(total_steps, batch_size, start_step)
  log_every = config.get("log_training_steps", 50)
  ckpt_every = config.get("ckpt_steps", 1000)
  image_every = config.get("image_steps", 2000)
  metrics = {}
  try:
    if start_step and eval_common.run_due(_missing_at(evals, workdir, start_step), start_step,
                                          total_steps, state, writer, log):
      # Resumed: the evals due at the checkpoint's step that an interruption cut short.
      progress.restart(start_step)
    pending = []  # The metrics of the steps since the last record, fetched together.
    for step in range(start_step + 1, total_steps + 1):
      batch = next(batches)
      state, metrics = update(state, batch)
      pending.append(metrics)
      if step % log_every == 0 or step == total_steps or step == start_step + 1:
        metrics = _interval_means(jax.device_get(pending))
        pending = []
        rate = progress.measure(step)
        log(progress.line(step, metrics, rate))
        writer.write(step, dict(metrics, img_per_sec=rate,
                                epoch=step * batch_size / num_train))
      if step != total_steps and (step % ckpt_every == 0 or step % image_every == 0):
        writer.flush()  # A remote metrics.jsonl: current in the checkpoint and the curve.
      if step % ckpt_every == 0 and step != total_steps:
        ckpt.save(step, state, _checkpoint_extra(step, batch_size, config))
      if step % image_every == 0 and step != total_steps:
        write_pictures(step, state["params"], vis_images)
        progress.restart(step)
      if step != total_steps and eval_common.run_due(evals, step, total_steps, state, writer,
                                                     log):
        # The evaluations' buffers go back to the system before training's come again.
        host_allocator.release_free_memory()
        progress.restart(step)

    # The end: final checkpoint and pictures.
    if total_steps > start_step:
      writer.flush()
      ckpt.save(total_steps, state, _checkpoint_extra(total_steps, batch_size, config))
      write_pictures(total_steps, state["params"], vis_images)
      eval_common.run_due(evals, total_steps, total_steps, state, writer, log)
  finally:  # Also when interrupted: let pending checkpoint writes finish.
    ckpt.wait()
    ckpt.close()
    writer.close()
    if hasattr(batches, "close"):
      batches.close()
  log(f"done: {total_steps} steps; workdir {workdir}")
  return state, metrics


def main(argv, config):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  f = flags.FLAGS
  try:  # Before any other JAX call: one process per host joins the others.
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  workdir = flags.FLAGS.workdir
  if not workdir:
    print("error: --workdir DIR is required", file=sys.stderr)
    sys.exit(2)
  try:
    train(config, workdir)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  except FileNotFoundError as e:  # Missing dataset, weights or init_from checkpoint.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  # Several processes leave the distributed runtime together (a barrier; nothing with
  # one): else process 0's coordination service can go while the others still tear
  # down, and they abort or hang at exit.
  jax.distributed.shutdown()


def run():
  host_allocator.restart_with_jemalloc()  # Before any XLA work.
  # Flags are defined here, not at import, so tools can import this module.
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs "
                      "outside TPU pods and SLURM; see big_vision/distributed.py).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with coordinator_address).")
  # The config is loaded and checked before absl, jax compilation or data: a bad value
  # costs one line and no time.
  config, rest = config_cli.load_or_exit(sys.argv[1:], check=check_trainable)
  app.run(functools.partial(main, config=config), argv=[sys.argv[0]] + rest)


if __name__ == "__main__":
  run()

