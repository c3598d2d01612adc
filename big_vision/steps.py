"""Training length and intervals given in steps or epochs, resolved in one place."""
import math

from big_vision.config_parsing import ConfigError


def check(config, name):
  """Raises ConfigError unless `name`'s length is given at most once and sensibly: steps
  and epochs >= 0, a fraction of total_steps in [0, 1]. Needs no dataset, so the trainer
  calls it before reading any data."""
  given = {k: config.get(k) for k in (f"{name}_steps", f"{name}_epochs", f"{name}_fraction")
           if config.get(k) is not None}
  if len(given) > 1:
    raise ConfigError(f"give only one of {', '.join(given)}")
  for key, value in given.items():
    if key.endswith("_fraction") and not 0 <= value <= 1:
      raise ConfigError(f"{key}={value} is a share of total_steps and must lie in [0, 1]")
    if value < 0:
      raise ConfigError(f"{key}={value} must be >= 0")


def resolve(config, name, num_train_examples, batch_size, default=None):
  """Steps for `name`: config.{name}_steps, or config.{name}_epochs x examples / batch.

  Also understands `{name}_fraction` as a share of total_steps (for warmup).
  """
  check(config, name)
  steps = config.get(f"{name}_steps")
  epochs = config.get(f"{name}_epochs")
  fraction = config.get(f"{name}_fraction")
  if steps is not None:
    return int(steps)
  if epochs is not None:
    return int(math.ceil(epochs * num_train_examples / batch_size))
  if fraction is not None:
    return int(round(fraction * resolve(config, "total", num_train_examples, batch_size)))
  if default is None:
    raise ConfigError(f"config needs {name}_steps or {name}_epochs")
  return default
