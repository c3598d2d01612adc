"""Training length and intervals given in steps or epochs, resolved in one place."""
import math


def resolve(config, name, num_train_examples, batch_size, default=None):
  """Steps for `name`: config.{name}_steps, or config.{name}_epochs x examples / batch.

  Also understands `{name}_fraction` as a share of total_steps (for warmup).
  """
  steps = config.get(f"{name}_steps")
  epochs = config.get(f"{name}_epochs")
  fraction = config.get(f"{name}_fraction")
  given = [k for k, v in ((f"{name}_steps", steps), (f"{name}_epochs", epochs),
                          (f"{name}_fraction", fraction)) if v is not None]
  if len(given) > 1:
    raise ValueError(f"give only one of {', '.join(given)}")
  if steps is not None:
    return int(steps)
  if epochs is not None:
    return int(math.ceil(epochs * num_train_examples / batch_size))
  if fraction is not None:
    return int(round(fraction * resolve(config, "total", num_train_examples, batch_size)))
  if default is None:
    raise ValueError(f"config needs {name}_steps or {name}_epochs")
  return default
