"""Scaling out: gradient accumulation equals the full batch; replicated and FSDP training
agree on 8 simulated devices and FSDP really splits the arrays."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_train import fmnist_config, read_metrics
from big_vision import config_cli
from big_vision import diffusion as diffusion_lib
from big_vision import objective
from big_vision import train
from big_vision import train_step
from big_vision.models import ae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grad_accumulation_equals_full_batch(data_dir, tmp_path):
  """Through the trainer; UMD's clean/noised split over micro-batches is tested below."""
  states = {}
  # Most compiler optimisations off (both runs alike): compiling was most of the time.
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    for accum in (1, 4):
      config = fmnist_config(data_dir, "method=maskdit,total_steps=3,lr=1e-2",
                             log_training_steps=1, grad_accum_steps=accum)
      states[accum], _ = train.train(config, str(tmp_path / f"accum{accum}"))
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
  a, b = (read_metrics(str(tmp_path / f"accum{k}")) for k in (1, 4))
  for ra, rb in zip(a, b):
    assert rb.keys() == ra.keys()
    for k in ("loss", "loss_clean", "loss_noised"):
      if k in ra:
        assert rb[k] == pytest.approx(ra[k], rel=1e-5), k
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
  for x, y in zip(jax.tree_util.tree_leaves(states[1]["params"]),
                  jax.tree_util.tree_leaves(states[4]["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def _one_step_setup(no_noise_prob, batch_size):
  """A Mu/4 UMD config, its model and diffusion, SGD (lr 1), a fresh state, a batch."""
  config, _ = config_cli.load_from_argv([
      f"--config=configs/ae_fmnist.py:variant=Mu/4,no_noise_prob={no_noise_prob},"
      "evals=False,total_steps=1"])
  model = ae.build_model(config.model)
  diffusion = diffusion_lib.GaussianDiffusion.create("cosine", 1000)
  tx = optax.sgd(1.0)
  init_state = train_step.make_init_state(config, train_step.make_init_params(model), tx)
  state = init_state(jax.random.PRNGKey(0))
  images = jax.random.uniform(jax.random.PRNGKey(1), (batch_size, 28, 28, 1), minval=-1)
  batch = dict(image=images, label=jnp.zeros((batch_size,), jnp.int32))
  return config, model, diffusion, tx, state, batch


def test_clean_rows_are_a_random_share_of_the_batch_each_step():
  """The clean branch takes the first rows of the step's random row order: on several
  hosts, the batch's first rows are always process 0's shard of the data."""
  batch_size, rng = 16, jax.random.PRNGKey(2)
  config, model, diffusion, tx, state, batch = _one_step_setup(0.5, batch_size)
  update = jax.jit(train_step.make_update(config, model, diffusion, tx, lambda s: 1.0, rng,
                                          batch_size, 1))
  _, metrics = update(state, batch)
  # The loss of the batch in that order, with the step's per-example keys.
  step_key = jax.random.fold_in(rng, 0)
  order = train_step.row_order(step_key, batch_size)
  # Jitted: the same computation, compiled once instead of run op by op.
  loss, m = jax.jit(lambda params, images, keys: objective.umd_loss(
      train_step.make_apply(model), params, images, None, keys, diffusion, no_noise_prob=0.5,
      mask_ratio=config.mask_ratio, mask_ratio_no_noise=config.mask_ratio_no_noise,
      grid=model.grid, patch_size=model.patch_size))(
          state["params"], batch["image"][order], jax.random.split(step_key, batch_size))
  np.testing.assert_allclose(metrics["loss_clean"], m["loss_clean"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  # Each step another half of the rows is clean, every row clean in some step.
  clean = [set(np.asarray(train_step.row_order(jax.random.fold_in(rng, s), batch_size))[:8])
           for s in range(6)]
  assert len({frozenset(c) for c in clean}) == 6
  assert set().union(*clean) == set(range(batch_size))


@pytest.mark.parametrize("no_noise_prob,accum", [
    (0.3, 4),    # 10 clean of 32: micro-batches of 3, 3, 2, 2 (rounding each: 2 x 4).
    (0.05, 4),   # 2 clean of 32: two micro-batches have none (rounding each: 0).
])
def test_umd_grad_accumulation_is_the_full_batch_computation(no_noise_prob, accum):
  """One update with plain SGD (lr 1): the parameter change is minus the gradient."""
  batch_size = 32
  micro = batch_size // accum
  # Rounding per micro-batch would give a different clean share: the case is real.
  assert (objective.split_sizes(micro, no_noise_prob)[0] * accum
          != objective.split_sizes(batch_size, no_noise_prob)[0])
  config, model, diffusion, tx, state, batch = _one_step_setup(no_noise_prob, batch_size)
  results = {}
  for k in (1, accum):
    config.grad_accum_steps = k
    update = train_step.make_update(config, model, diffusion, tx, lambda s: 1.0,
                                    jax.random.PRNGKey(2), batch_size, 1)
    results[k] = jax.jit(update)(state, batch)
  (full, full_m), (acc, acc_m) = results[1], results[accum]
  assert set(full_m) == set(acc_m) and {"loss_clean", "loss_noised"} <= set(full_m)
  for k in ("loss", "loss_clean", "loss_noised", "grad_norm"):
    np.testing.assert_allclose(acc_m[k], full_m[k], rtol=1e-5, err_msg=k)
  for p0, p1, p4 in zip(*(jax.tree_util.tree_leaves(s["params"])
                          for s in (state, full, acc))):
    np.testing.assert_allclose(p0 - p4, p0 - p1, rtol=1e-4, atol=1e-7)


def test_replicated_and_fsdp_agree_on_8_devices(data_dir, tmp_path):
  code = textwrap.dedent(f"""
    import json, jax, numpy as np, optax
    from tests.test_train import fmnist_config, read_metrics
    from big_vision import train
    assert jax.device_count() == 8
    out = {{}}
    shards = lambda x: sorted({{tuple(s.data.shape) for s in x.addressable_shards}})
    fc1 = lambda tree: tree["encoder"]["block_00"]["mlp"]["fc1"]["kernel"]
    for fsdp in (False, True):
      config = fmnist_config({data_dir!r}, f"variant=Mu/4,total_steps=3,fsdp={{fsdp}}",
                             log_training_steps=1)
      workdir = {str(tmp_path)!r} + f"/fsdp{{fsdp}}"
      state, _ = train.train(config, workdir)
      out[str(fsdp)] = [r["loss"] for r in read_metrics(workdir)]
      out[str(fsdp) + "_shards"] = shards(fc1(state["params"]))
      # Adam's moments: the same kernel's, and whether every moment is split like its
      # parameter (a replicated opt_state under FSDP would hold 8x the memory).
      params = jax.tree_util.tree_leaves(state["params"])
      for name in ("mu", "nu"):
        moments = optax.tree_utils.tree_get(state["opt_state"], name)
        out[str(fsdp) + f"_{{name}}_shards"] = shards(fc1(moments))
        out[str(fsdp) + f"_{{name}}_like_params"] = all(
            shards(m) == shards(p) for m, p in zip(
                jax.tree_util.tree_leaves(moments), params, strict=True))
    print("RESULT" + json.dumps(out))
  """)
  # Most compiler optimisations off: both runs compile the same way, and compiling the
  # programs, not running them, was most of this test's time.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", WANDB_MODE="disabled", PYTHONPATH=ROOT,
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  assert proc.returncode == 0 and line, proc.stderr[-3000:]
  import json
  out = json.loads(line[0][len("RESULT"):])
  np.testing.assert_allclose(out["True"], out["False"], rtol=1e-5)
  # Replicated: every device holds the whole (64, 256) kernel; FSDP: 1/8 of it, split
  # along its largest dimension. Its Adam moments likewise, and every moment like its
  # parameter.
  for fsdp, kernel_shard in (("False", [64, 256]), ("True", [64, 32])):
    for what in ("", "_mu", "_nu"):
      assert out[fsdp + what + "_shards"] == [kernel_shard], (fsdp, what)
    assert out[fsdp + "_mu_like_params"] and out[fsdp + "_nu_like_params"], fsdp
