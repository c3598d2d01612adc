"""Evaluator data collection across two processes (jax.distributed on the CPU, gloo):
every process's real rows exactly once, uneven shards, max_examples, global sums."""
import textwrap

from tests import processes

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", 2, pid)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from big_vision import input_pipeline
    from big_vision.evaluators import common
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    # Two local batches of 2 per process; 3 real rows on process 0, 2 on process 1.
    real = {0: [[1, 1], [1, 0]], 1: [[1, 1], [0, 0]]}[pid]
    batches = [{"x": np.array([10 * pid + 2 * i, 10 * pid + 2 * i + 1], np.float32),
                input_pipeline.MASK_KEY: np.array(m, bool)} for i, m in enumerate(real)]
    input_pipeline.evaluation = lambda cfg: (batches, 5)
    ctx = type("Ctx", (), {"data_sharding": sharding})()
    cfg = {"data": {"name": "toy", "split": "test"}}
    everything = common.collect(ctx, cfg, lambda b: {"x": b["x"]})["x"]
    limited = common.collect(ctx, cfg, lambda b: {"x": b["x"]}, max_examples=3)["x"]
    total = jax.jit(lambda x, m: jax.numpy.sum(x * m))
    s = sum(float(total(b["x"], b[input_pipeline.MASK_KEY].astype(np.float32)))
            for b in common.iterate(ctx, cfg))
    print("RESULT", sorted(everything.tolist()), len(limited), s, flush=True)
    jax.distributed.shutdown()
""")


def test_collect_on_two_processes_gets_each_real_row_once(tmp_path):
  script = tmp_path / "collect.py"
  script.write_text(SCRIPT)
  port = processes.free_port()
  for out in processes.run_all([[str(script), str(port), str(i)] for i in range(2)]):
    line = [l for l in out.splitlines() if l.startswith("RESULT")][0]
    assert line == "RESULT [0.0, 1.0, 2.0, 10.0, 11.0] 3 24.0", line


CACHE_SCRIPT = textwrap.dedent("""
    import os
    import sys
    import types
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", 2, pid)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from big_vision import input_pipeline
    from big_vision.evaluators import fid_math
    from big_vision.evaluators import fid_scorer
    from big_vision.models import fmnist_classifier
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    weights = os.path.join(tmp, f"net{pid}.npz")  # The same weights on both hosts.
    params = fmnist_classifier.Classifier().init(jax.random.PRNGKey(0),
                                                 np.zeros((1, 28, 28, 1)))["params"]
    fmnist_classifier.save(params, weights, {})
    images = np.random.default_rng(pid).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    batches = [{"image": images, input_pipeline.MASK_KEY: np.ones(4, bool)}]
    input_pipeline.evaluation = lambda cfg: (batches, 8)
    ctx = types.SimpleNamespace(data_sharding=sharding,
                                model=types.SimpleNamespace(image_size=(28, 28), channels=1))
    ref_cfg = dict(data=dict(name="fashion_mnist_local", split="test"), pp="x")
    # Per-host cache directories (local disks); only host 0 has the statistics already.
    scorer = fid_scorer.Scorer(ctx, dict(kind="fmnist_classifier", weights=weights), ref_cfg,
                               max_reference=8, cache_dir=os.path.join(tmp, f"cache{pid}"))
    if pid == 0:
      fid_math.save_statistics(fid_math.cache_path(scorer.cache_dir, scorer.cache_key()),
                               np.zeros(128), np.eye(128))
    mu, sigma = scorer.reference()
    print("RESULT", float(np.abs(mu).sum()) > 0, flush=True)
    jax.distributed.shutdown()
""")


def test_reference_statistics_cached_on_one_host_only(tmp_path):
  """Computing the reference statistics is collective: a cache file that one host has and
  another lacks must not leave the other waiting for it forever."""
  script = tmp_path / "cache.py"
  script.write_text(CACHE_SCRIPT)
  port = processes.free_port()
  outputs = processes.run_all([[str(script), str(port), str(i), str(tmp_path)]
                               for i in range(2)], timeout=150)
  for out in outputs:  # Both computed them from the real images of both hosts.
    assert "RESULT True" in out, out


def test_an_eval_missing_a_file_on_another_host_is_skipped_on_every_host(data_dir, tmp_path,
                                                                        monkeypatch):
  # Its data loops are collective: run by some hosts only, they would wait forever.
  import ml_collections  # pylint: disable=g-import-not-at-top
  from big_vision.evaluators import common  # pylint: disable=g-import-not-at-top
  from tests.test_evaluators import make_context  # pylint: disable=g-import-not-at-top
  ctx, _ = make_context(data_dir, str(tmp_path))
  config = ml_collections.ConfigDict(dict(evals=dict(val=dict(type="diffusion_loss"))))
  assert len(common.build(config, ctx, 100, 10)) == 1  # Here, every file is there.
  monkeypatch.setattr(common, "on_every_process", lambda ok: False)  # Not on another host.
  said = []
  assert common.build(config, ctx, 100, 10, log=said.append) == []
  assert said == ["eval val skipped: a file it needs is missing on another host"]


def test_an_eval_missing_its_feature_net_on_another_host_goes_without_fid_on_every_host(
    data_dir, tmp_path, monkeypatch):
  # Scoring is collective too: hosts with the weights must drop FID/IS with the others.
  import ml_collections  # pylint: disable=g-import-not-at-top
  from big_vision.evaluators import common  # pylint: disable=g-import-not-at-top
  from tests.test_evaluators import make_context  # pylint: disable=g-import-not-at-top
  from tests.test_fid_statistics import _fmnist_weights  # pylint: disable=g-import-not-at-top
  ctx, _ = make_context(data_dir, str(tmp_path))
  config = ml_collections.ConfigDict(dict(evals=dict(i=dict(
      type="inpainting", feature_net=dict(kind="fmnist_classifier", weights=_fmnist_weights(
          str(tmp_path / "net.npz")))))))
  assert common.build(config, ctx, 100, 10)[0].evaluator.scorer is not None  # All there.
  votes = iter([True, False])  # Every host has the eval's files; one lacks the weights.
  monkeypatch.setattr(common, "on_every_process", lambda ok: next(votes))
  said = []
  built = common.build(config, ctx, 100, 10, log=said.append)
  assert len(built) == 1 and built[0].evaluator.scorer is None
  assert said == ["eval i without FID/IS: the feature network's weights are missing on "
                  "another host"]

