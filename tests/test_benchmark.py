"""The benchmark tool: its FLOP counts agree, and one run reports every figure."""
import json
import os
import re
import statistics
import subprocess
import sys

import jax
import pytest

from big_vision.tools import benchmark
from configs import ae_fmnist
from configs import ae_i1k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("arg", ["method=umd,variant=Mu/4", "method=dit,variant=Mu/2",
                                 "method=mae,variant=Mu/4,adaln=False",
                                 "method=diffmae,variant=Mu/4",
                                 "method=diffmae,variant=Mu/4,decoder_attention=cross_self",
                                 "method=diffmae,variant=Mu/4,decoder_attention=cross"])
def test_analytic_matmul_flops_match_xla_count(arg):
  """XLA counts the matmuls plus elementwise work: a little above the analytic count."""
  config = ae_fmnist.get_config(arg + ",batch_size=8,evals=False")
  analytic = benchmark.analytic_flops_per_image(config)
  xla = benchmark.flops_per_image(config)
  assert analytic < xla < 1.25 * analytic, (analytic, xla)


# Subprocesses compile with LLVM's -O0: most of these tests' time is XLA:CPU compiling
# (three steps and a sampler in the one below); -O0 halves it and leaves the HLO, its
# fusions and the metadata the profile reads as they are.
_ENV = dict(os.environ, JAX_PLATFORMS="cpu",
            XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"))


@pytest.mark.parametrize("arg", ["", "method=mae"])
def test_every_compared_variant_overrides_keys_the_configs_have(arg):
  """--compare's variants change keys the configs have (the run would ignore a new one)
  to values other than the config's; compiled and timed below for two of them."""
  for config in (ae_fmnist.get_config(arg or None), ae_i1k.get_config(arg or None)):
    for name, overrides in benchmark.VARIANTS:
      for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
          node = node[parent]
        assert leaf in node and node[leaf] != value, (name, key)


def test_run_reports_every_figure(tmp_path):
  path = tmp_path / "b.json"
  code = ("from big_vision.tools import benchmark\n"
          "from configs import ae_fmnist\n"
          # Two of --compare's variants: each one is a compilation (the test above checks
          # the others' overrides; test_models and test_objective their results).
          "benchmark.VARIANTS = benchmark.VARIANTS[:1] + benchmark.VARIANTS[-1:]\n"
          # One of --ablate's parts (the test below checks that each changes the step).
          "benchmark.ABLATIONS = benchmark.ABLATIONS[:1]\n"
          "config = ae_fmnist.get_config('variant=Mu/4,batch_size=16,evals=False,"
          "sampling_timesteps=3')\n"
          "benchmark.run(config, steps=2, sample_count=4, input_batches=3, evals=False,\n"
          "              compare=True, profile_steps=1, log=lambda l: print('LOG', l),\n"
          f"              out_path={str(path)!r}, ablate=True)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=_ENV, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(path) as f:
    out = json.load(f)
  lines = [l[4:] for l in result.stdout.splitlines() if l.startswith("LOG ")]
  train = out["train"]
  assert train["flops_source"].startswith("XLA cost analysis")  # XLA counts on a CPU.
  assert train["flops_per_image"] == train["xla_flops_per_image"] > 0
  assert train["images_per_s"] > 0 and train["compile_s"] > 0
  assert train["achieved_flops"] == pytest.approx(train["flops_per_image"]
                                                  * train["images_per_s"])
  assert 0 < train["fraction_of_peak"] < 1.5 and out["peak_flops"] > 1e9
  # Each timed step is compared with matmuls timed right before and after it.
  assert len(train["matmul_rates_between_steps"]) == len(train["step_times_s"]) + 1 == 3
  assert 0 < train["fraction_of_peak_paired"] < 1.5
  assert out["host_allocator"] in ("tcmalloc", "jemalloc", "glibc")
  assert out["sampling"]["steps_in_one_program"] and out["sampling"]["sampling_timesteps"] == 3
  assert out["input"]["images_per_s"] > 0
  assert set(out["train_variants"]) == {benchmark.VARIANTS[0][0], benchmark.VARIANTS[-1][0]}
  for variant in out["train_variants"].values():
    assert variant["images_per_s"] > 0
    # Timed in turns with the config's own step: one of each per round.
    assert len(variant["step_times_s"]) == len(variant["config_step_times_s"]) == 2
    assert variant["time_cost_vs_config"] == pytest.approx(statistics.median(
        t / b for t, b in zip(variant["step_times_s"], variant["config_step_times_s"])) - 1)
  assert any(line.startswith("train:") and "of" in line for line in lines)
  # --ablate: the attention core's wall time, from the same rounds as its stand-in's step.
  part = out["train_ablations"][benchmark.ABLATIONS[0][0]]
  assert len(part["step_times_s"]) == len(part["config_step_times_s"]) == 2
  assert part["step_time_saved_s"] == pytest.approx(statistics.median(
      b - t for b, t in zip(part["config_step_times_s"], part["step_times_s"])))
  assert part["share_of_step"] == pytest.approx(
      part["step_time_saved_s"] / statistics.median(part["config_step_times_s"]))
  assert any(line.strip().startswith(benchmark.ABLATIONS[0][0]) for line in lines)
  # The profile: device time by category, the matmuls among it, and the costliest ops.
  prof = train["profile"]
  assert prof["by_category_ms"]["matmul"] > 0 and prof["top_ops"]
  # ... and under the model's modules: the MLP's matmuls, forward and backward.
  assert prof["by_module_ms"]["forward encoder/block_*/mlp/fc1"]["matmul"] > 0
  assert prof["by_module_ms"]["backward encoder/block_*/mlp/fc1"]["matmul"] > 0
  assert any(line.startswith("profile:") for line in lines)


@pytest.mark.parametrize("arg", ["", "method=diffmae,decoder_attention=cross,"])
def test_each_ablation_changes_the_step_and_is_undone(arg):
  """--ablate's stand-ins reach the traced step (its program differs from the config's,
  and by the part replaced), and the model's functions are restored after each; also
  with DiffMAE's cross-attention, whose queries and keys differ in number."""
  config = ae_fmnist.get_config(arg + "variant=Mu/4,batch_size=8,evals=False")

  def step_text():
    _, _, update, state, batch = benchmark._setup(config)  # pylint: disable=protected-access
    return update.lower(state, batch).as_text()

  base = step_text()
  for name, module, attribute, stand_in in benchmark.ABLATIONS:
    original = getattr(module, attribute)
    with benchmark._replaced(module, attribute, stand_in):  # pylint: disable=protected-access
      text = step_text()
    assert getattr(module, attribute) is original, name
    # Fewer of the op the part computes with: the softmax's exponentials, GELU's tanh,
    # the LayerNorms' 1/std, AdamW's square roots (the time embedding and the gradient
    # norm keep some of theirs).
    op = next(o for part, o in (("attention", "exponential"), ("GELU", "tanh"),
                                 ("LayerNorm", "rsqrt"), ("AdamW", "sqrt")) if part in name)
    count = lambda t: t.count(f"stablehlo.{op} ")
    assert count(text) < count(base), (name, count(text), count(base))


# A subprocess prelude: importing TensorFlow, TFDS or wandb fails, as on a bare GPU box.
_WITHOUT_TENSORFLOW = (
    "import sys\n"
    "class Block:\n"
    "  def find_spec(self, name, path=None, target=None):\n"
    "    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'wandb'):\n"
    "      raise ImportError('blocked ' + name)\n"
    "sys.meta_path.insert(0, Block())\n")


def test_step_and_sampler_need_no_tensorflow():
  """A GPU box without TensorFlow can still time the step: nothing on that path imports
  it (the input pipeline is imported only to time the input)."""
  code = (_WITHOUT_TENSORFLOW +
          "from big_vision.tools import benchmark\n"
          "from configs import ae_i1k\n"
          "c = ae_i1k.get_config('variant=Mu/4,size=16,batch_size=4,sampling_timesteps=2')\n"
          # Without a matmul between steps, as on an accelerator: rounds of steps
          # dispatched back to back, the time per step of each round.
          "step, compiled = benchmark.bench_train_step(c, 10)\n"
          "s = benchmark.bench_sampling(c, compiled.model, compiled.diffusion,\n"
          "                             compiled.state['params'], 2)\n"
          "print('rounds', len(step['step_times_s']), step['timing'])\n"
          "print('ok', step['images_per_s'] > 0 and s['images_per_s'] > 0)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=_ENV, check=False)
  assert result.returncode == 0 and "ok True" in result.stdout, result.stderr[-2000:]
  assert "rounds 2 median of 2 rounds of 5 steps dispatched back to back" in result.stdout


def test_grad_accumulation_does_not_divide_the_flop_count():
  """Accumulation is a scan over micro-batches, whose body XLA counts once: the count is
  taken without it."""
  options = "variant=Mu/4,batch_size=8,evals=False"
  config = ae_fmnist.get_config(options)
  accum = ae_fmnist.get_config(options + ",grad_accum=4")
  assert benchmark._is_plain(config) and not benchmark._is_plain(accum)
  assert benchmark.flops_per_image(accum) == pytest.approx(benchmark.flops_per_image(config),
                                                           rel=1e-3)


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12), ("NVIDIA A10G", None), ("Some New GPU", None),
])
def test_gpu_peak_matches_whole_model_names(kind, peak):
  assert benchmark.gpu_peak(kind) == peak


def test_matmul_timer_reports_the_median_round(monkeypatch):
  """The reference between CPU steps is the median of its rounds, not the first (which
  reads low right after a step)."""
  rate = benchmark.matmul_timer(n=8, repeats=3)
  clock = iter([0.0, 4.0, 10.0, 11.0, 20.0, 22.0])  # Rounds of 4, 1 and 2 seconds.
  monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(clock))
  assert rate() == 2 * 8 ** 3 / 2.0


def test_unknown_accelerator_has_no_peak(monkeypatch):
  class Device:
    platform, device_kind = "gpu", "NVIDIA A10G"
  monkeypatch.setattr(benchmark.jax, "devices", lambda: [Device()])
  peak, why = benchmark.device_peak()
  assert peak is None and "no known peak for 'NVIDIA A10G'" in why


@pytest.mark.parametrize("adaln", [True, False])
def test_condition_flops_count_the_condition_layers(adaln):
  """2 FLOPs per weight of every Dense layer that takes the condition (encoder width, here
  twice the decoder's), once per image."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from big_vision.models import ae  # pylint: disable=g-import-not-at-top
  config = ae_fmnist.get_config(f"variant=Ti/4,adaln={adaln},evals=False")
  model = ae.build_model(config.model)
  assert model.width != model.decoder_width
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)},
      jnp.zeros((1, 28, 28, 1)), jnp.zeros(1, jnp.int32)))["params"]
  names = ("adaln_modulation", "final_modulation", "decoder_cond")
  weights = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(shapes)
                if path[-1].key == "kernel" and any(n in jax.tree_util.keystr(path)
                                                    for n in names))
  assert weights and benchmark.condition_flops_per_image(model) == 2 * weights


def test_without_tensorflow_evals_are_skipped_and_json_is_written_on_failure(tmp_path):
  """No TensorFlow: the evals are skipped with the reason; a part that fails still leaves
  the JSON of what was measured before it (and the error); an accelerator of unknown peak
  gets no share of peak."""
  code = ("import json\n" + _WITHOUT_TENSORFLOW +
          "from big_vision.tools import benchmark\n"
          "from configs import ae_i1k\n"
          "benchmark.device_peak = lambda: (None, 'no known peak for X')\n"
          "c = ae_i1k.get_config('variant=Mu/4,size=16,batch_size=4,sampling_timesteps=2')\n"
          f"path = {str(tmp_path / 'b.json')!r}\n"
          "benchmark.run(c, steps=1, input_batches=1, sampling=False, out_path=path)\n"
          "out = json.load(open(path))\n"
          "print('evals', out['evals'].startswith('skipped: ') and 'blocked' in out['evals'])\n"
          "print('peak', out['peak_flops'] is None and out['train']['fraction_of_peak'] is None)\n"
          "def boom(*a, **k): raise RuntimeError('boom')\n"
          "benchmark.bench_sampling = boom\n"
          "try:\n"
          "  benchmark.run(c, steps=1, input_batches=1, evals=False, out_path=path)\n"
          "except RuntimeError:\n"
          "  out = json.load(open(path))\n"
          "  print('kept', out['train']['images_per_s'] > 0, out['error'])\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=_ENV, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "evals True" in result.stdout and "peak True" in result.stdout, result.stdout
  assert "kept True RuntimeError: boom" in result.stdout, result.stdout


def test_figures_go_to_a_json_file_without_out(tmp_path, monkeypatch):
  """Without --out the JSON goes under workdirs/benchmarks/, named by what was timed."""
  monkeypatch.chdir(tmp_path)
  path = benchmark.default_out_path(ae_fmnist.get_config("variant=S/4,batch_size=128"))
  platform = jax.devices()[0].platform
  assert re.fullmatch(rf"workdirs/benchmarks/{platform}_S4_b128_\d{{8}}-\d{{6}}\.json",
                      path), path
  benchmark.write_json({"train": {"images_per_s": 1.0}}, path)
  assert json.load(open(tmp_path / path)) == {"train": {"images_per_s": 1.0}}
