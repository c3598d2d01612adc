"""The benchmark tool: its FLOP counts agree, and one run reports every figure."""
import pytest

from big_vision.tools import benchmark
from configs import ae_fmnist


@pytest.mark.parametrize("arg", ["method=umd,variant=Mu/4", "method=dit,variant=Mu/2",
                                 "method=mae,variant=Mu/4,adaln=False"])
def test_analytic_matmul_flops_match_xla_count(arg):
  """XLA counts the matmuls plus elementwise work: a little above the analytic count."""
  config = ae_fmnist.get_config(arg + ",batch_size=8,evals=False")
  analytic = benchmark.analytic_flops_per_image(config)
  xla = benchmark.flops_per_image(config)
  assert analytic < xla < 1.25 * analytic, (analytic, xla)


def test_run_reports_every_figure():
  config = ae_fmnist.get_config("variant=Mu/4,batch_size=16,evals=False,sampling_timesteps=3")
  lines = []
  out = benchmark.run(config, steps=2, sample_count=4, input_batches=3, evals=False,
                      compare=True, log=lines.append)
  train = out["train"]
  assert train["images_per_s"] > 0 and train["compile_s"] > 0
  assert train["achieved_flops"] == pytest.approx(train["flops_per_image"]
                                                  * train["images_per_s"])
  assert 0 < train["fraction_of_peak"] < 1.5 and out["peak_flops"] > 1e9
  assert out["host_allocator"] in ("tcmalloc", "jemalloc", "glibc")
  assert out["sampling"]["steps_in_one_program"] and out["sampling"]["sampling_timesteps"] == 3
  assert out["input"]["images_per_s"] > 0
  assert set(out["train_variants"]) == {name for name, _ in benchmark.VARIANTS}
  for variant in out["train_variants"].values():
    assert variant["images_per_s"] > 0
  assert any(line.startswith("train:") and "of" in line for line in lines)
