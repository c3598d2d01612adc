r"""Evaluates a checkpoint with the config's evals and appends the results to metrics.jsonl.

  python -m big_vision.tools.eval_only --config configs/ae_fmnist.py --workdir DIR
  python -m big_vision.tools.eval_only --config ... --workdir DIR --checkpoint DIR/checkpoints/900

Without --checkpoint, the latest checkpoint in DIR. Results are logged at the checkpoint's
step with the eval names as prefixes, exactly as during training.
"""
import functools
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from big_vision import checkpointing
from big_vision import config_cli
from big_vision import diffusion as diffusion_lib
from big_vision import host_allocator
from big_vision import methods
from big_vision import metric_writer
from big_vision import sharding
from big_vision.evaluators import common as eval_common
from big_vision.models import ae


def evaluate(config, workdir, checkpoint=None):
  """Runs every eval of config.evals on the checkpoint. Returns {name: value}."""
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
  if not evals:
    raise SystemExit("config.evals is empty: nothing to evaluate")
  writer = metric_writer.MetricWriter(workdir, config, is_main=jax.process_index() == 0)
  try:
    return eval_common.run_due(evals, step, step, state, writer, metric_writer.log, force=True)
  finally:
    writer.close()


def main(argv, config):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not flags.FLAGS.workdir:
    print("error: --workdir DIR is required", file=sys.stderr)
    sys.exit(2)
  try:
    evaluate(config, flags.FLAGS.workdir, flags.FLAGS.checkpoint)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  host_allocator.restart_with_jemalloc()  # Before any XLA work.
  flags.DEFINE_string("workdir", None, "The run's workdir; results go to its metrics.jsonl.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint (workdir, checkpoints/ or a step "
                      "folder); default: the latest in --workdir.")
  config, rest = config_cli.load_or_exit(sys.argv[1:], check=methods.check_config)
  app.run(functools.partial(main, config=config), argv=[sys.argv[0]] + rest)


if __name__ == "__main__":
  run()
