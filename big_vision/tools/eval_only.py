r"""Evaluates a checkpoint with the config's evals and appends the results to metrics.jsonl.

  python -m big_vision.tools.eval_only --workdir DIR
  python -m big_vision.tools.eval_only --config configs/ae_fmnist.py --workdir DIR
  python -m big_vision.tools.eval_only --config ... --workdir DIR --checkpoint DIR/checkpoints/900

Without --checkpoint, the latest checkpoint in DIR. Without --config, the run's own
DIR/config.json (saved by the trainer; --config.a.b=value overrides still apply). With
--config, its evals are used, but the fields that define the trained function (the method's
mask ratios and no_noise_prob, the model and the diffusion) must match the run's saved
config: a DiT checkpoint has UMD's parameter tree, and evaluating it as UMD would silently
use the wrong probe features and loss weighting. Results are logged at the checkpoint's
step with the eval names as prefixes, exactly as during training.
"""
import copy
import dataclasses
import functools
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from big_vision import checkpointing
from big_vision import config_cli
from big_vision import diffusion as diffusion_lib
from big_vision import fileio
from big_vision import host_allocator
from big_vision import methods
from big_vision import metric_writer
from big_vision import sharding
from big_vision.config_parsing import ConfigError
from big_vision.evaluators import common as eval_common
from big_vision.models import ae

# Config fields that define the trained function; the rest (evals, data, pp, ...) may differ.
RUN_FIELDS = ("mask_ratio", "mask_ratio_no_noise", "no_noise_prob", "noised_x0_loss", "model",
              "diffusion")
# Values of RUN_FIELDS that a config.json from before them lacks: what those runs did.
OLDER_RUNS = {"noised_x0_loss": True}
# Inside those: other ways to compute the same function, training-only and sampler settings.
MAY_DIFFER = ("model.remat_policy", "model.attention", "model.flat_dense",
              "model.autodiff_backward", "model.backward_kernels", "model.dtype_mm",
              "model.dtype_activations",
              "diffusion.sampling_timesteps", "diffusion.eta", "diffusion.clip_x0")
_UNSET = "<unset>"


def run_config_path(workdir, checkpoint=None):
  """DIR/config.json of the run that wrote the checkpoint (a workdir, its checkpoints/
  folder or one step's folder, as checkpointing.load_params takes; local or gs://...)."""
  path = fileio.absolute(checkpoint or workdir)
  if os.path.basename(path).isdigit():
    path = os.path.dirname(path)
  if os.path.basename(path) == "checkpoints":
    path = os.path.dirname(path)
  return os.path.join(path, "config.json")


def load_run_config(path):
  return ml_collections.ConfigDict(json.loads(fileio.read_text(path)))


def _flat(config):
  """{dotted name: value} of RUN_FIELDS, JSON-normalised (tuples as lists, like the file)."""
  plain = json.loads(config.to_json_best_effort())
  flat = {}
  for field in RUN_FIELDS:
    value = plain.get(field, OLDER_RUNS.get(field, _UNSET))
    if isinstance(value, dict):
      flat.update((f"{field}.{k}", v) for k, v in value.items())
    else:
      flat[field] = value
  return flat


def _model_default(key):
  """ae.Model's default for a model option an older config may not name."""
  name = key[len("model."):]
  for f in dataclasses.fields(ae.Model):
    if f.name == name and f.default is not dataclasses.MISSING:
      return json.loads(json.dumps(f.default))
  return _UNSET


def check_matches_run(config, saved, path):
  """Raises ConfigError naming every RUN_FIELDS value where config differs from the run's."""
  ours, theirs = _flat(config), _flat(saved)
  diffs = []
  for key in sorted(set(ours) | set(theirs)):
    if key in MAY_DIFFER:
      continue
    a, b = ours.get(key, _UNSET), theirs.get(key, _UNSET)
    if key.startswith("model."):  # A missing option means the model's default.
      a = _model_default(key) if a == _UNSET else a
      b = _model_default(key) if b == _UNSET else b
    if a != b:
      diffs.append(f"{key}: run {b!r}, config {a!r}")
  if diffs:
    hint = f"method={saved.get('method', 'umd')},variant={saved.model.get('variant')}"
    if saved.model.get("num_classes"):
      hint += ",use_labels=True"
    raise ConfigError(
        f"the config does not match the run's {path}: {'; '.join(diffs)}; omit --config "
        f"(and overrides of these fields) to use the run's own, or pass the run's options, "
        f"e.g. --config FILE.py:{hint}")


def resolve_config(config, workdir, checkpoint=None):
  """The config to evaluate with: config checked against the run's saved one, or (None)
  the saved one. Raises ConfigError on a mismatch or when there is neither."""
  path = run_config_path(workdir, checkpoint)
  saved = load_run_config(path) if fileio.exists(path) else None
  if config is None:
    if saved is None:
      raise ConfigError(f"no --config and no {path} to take the run's config from; "
                        f"pass --config FILE.py[:OPTIONS]")
    methods.check_config(saved)
    return saved
  if saved is None:
    logging.warning("%s not found: cannot check that --config matches the run", path)
  else:
    check_matches_run(config, saved, path)
  return config


def evaluate(config, workdir, checkpoint=None):
  """Runs every eval of config.evals on the checkpoint. Returns {name: value}.

  config=None takes the run's saved config; otherwise it must match it (see above).
  """
  config = resolve_config(config, workdir, checkpoint)
  mesh = sharding.make_mesh()
  model = ae.build_model(config.model)
  diffusion = diffusion_lib.GaussianDiffusion.create(config.diffusion.schedule,
                                                     config.diffusion.timesteps)
  state, step = checkpointing.load_params(checkpoint or workdir)
  state = jax.device_put(state, sharding.replicated(mesh))
  context = eval_common.Context(model=model, diffusion=diffusion, config=config,
                                workdir=workdir, mesh=mesh,
                                data_sharding=sharding.batch_sharding(mesh))
  evals = eval_common.build(config, context, num_train=1, batch_size=1)
  if not evals:  # build said why of each eval it skipped.
    raise SystemExit("every eval was skipped (see above): nothing to evaluate"
                     if config.get("evals") else "config.evals is empty: nothing to evaluate")
  writer = metric_writer.MetricWriter(workdir, config, is_main=jax.process_index() == 0)
  try:
    log = metric_writer.log if jax.process_index() == 0 else (lambda *_: None)  # One copy.
    return eval_common.run_due(evals, step, step, state, writer, log, force=True)
  finally:
    writer.close()


def main(argv, config, overrides=()):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not flags.FLAGS.workdir:
    print("error: --workdir DIR is required", file=sys.stderr)
    sys.exit(2)
  try:
    if config is None:  # The run's own config, with the command line's overrides.
      saved = resolve_config(None, flags.FLAGS.workdir, flags.FLAGS.checkpoint)
      config = copy.deepcopy(saved)
      for dotted, raw in overrides:
        config_cli.apply_override(config, dotted, raw)
      # An override of what defines the trained function is refused as such first (not
      # as whatever error the other model would give).
      check_matches_run(config, saved,
                        run_config_path(flags.FLAGS.workdir, flags.FLAGS.checkpoint))
      methods.check_config(config)
      logging.warning("evaluating with the run's saved config.json")
    evaluate(config, flags.FLAGS.workdir, flags.FLAGS.checkpoint)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  host_allocator.restart_with_jemalloc()  # Before any XLA work.
  flags.DEFINE_string("workdir", None, "The run's workdir; results go to its metrics.jsonl.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint (workdir, checkpoints/ or a step "
                      "folder); default: the latest in --workdir.")
  try:
    spec, overrides, rest = config_cli.split_argv(sys.argv[1:])
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  config = None  # No --config: the run's saved one, read once the flags are parsed.
  if spec is not None:
    config, rest = config_cli.load_or_exit(sys.argv[1:], check=methods.check_config)
    overrides = ()
  app.run(functools.partial(main, config=config, overrides=overrides),
          argv=[sys.argv[0]] + rest)


if __name__ == "__main__":
  run()
