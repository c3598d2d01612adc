"""The Inception FID network and its weights: loader checks, name mapping, outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision.evaluators import feature_nets
from big_vision.models import fmnist_classifier
from big_vision.models import inception
from big_vision.tools import convert_inception_weights as convert


def test_parameter_count_matches_inception_v3():
  shapes = inception.expected_shapes()
  total = sum(int(np.prod(s)) for k, s in shapes.items()
              if not k.endswith(("/mean", "/var")))
  # Inception-v3 has 23.8M weights (with the 1008-way head, ~23.9M).
  assert 23.5e6 < total < 24.2e6, total
  assert shapes["Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert shapes["fc/kernel"] == (2048, 1008)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  return inception.make_random_weights(str(tmp_path_factory.mktemp("inc") / "w.npz"))


def test_network_outputs_on_made_weights(weights):
  net = feature_nets.load("inception", weights)
  assert net.metric_suffix == ""  # Only the real network gives plain "fid".
  images = jax.random.uniform(jax.random.PRNGKey(0), (3, 28, 28, 1), minval=-1, maxval=1)
  feats, probs = net(np.asarray(images))
  assert feats.shape == (3, 2048) and probs.shape == (3, 1008)
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
  assert (feats >= 0).all() and feats.std() > 0  # Post-ReLU pool features, not constant.
  again, _ = net(np.asarray(images))
  np.testing.assert_array_equal(feats, again)


def test_loader_rejects_missing_and_misshaped(tmp_path, weights):
  with np.load(weights) as data:
    flat = {k: data[k] for k in data.files}
  broken = dict(flat)
  del broken["Mixed_7c/branch_pool/conv/kernel"]
  np.savez(tmp_path / "missing.npz", **broken)
  with pytest.raises(ValueError, match="missing: Mixed_7c/branch_pool/conv/kernel"):
    inception.load_fid_weights(str(tmp_path / "missing.npz"))
  broken = dict(flat, **{"fc/bias": np.zeros(1000)})
  np.savez(tmp_path / "shape.npz", **broken)
  with pytest.raises(ValueError, match="wrong shape: fc/bias"):
    inception.load_fid_weights(str(tmp_path / "shape.npz"))
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    inception.load_fid_weights(str(tmp_path / "nope.npz"))


def test_torch_name_mapping_round_trip(tmp_path, weights):
  with np.load(weights) as data:
    flat = {k: data[k] for k in data.files}
  # Build the state dict pytorch-fid would have, then convert it back.
  state = {}
  for k, v in flat.items():
    parts = k.split("/")
    if parts[-1] == "kernel" and parts[0] != "fc":
      state[".".join(parts[:-1] + ["weight"])] = v.transpose(3, 2, 0, 1)
    elif parts[0] == "fc":
      state["fc." + ("weight" if parts[-1] == "kernel" else "bias")] = (
          v.T if parts[-1] == "kernel" else v)
    else:
      torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                    "var": "running_var"}[parts[-1]]
      state[".".join(parts[:-1] + ["bn", torch_name])] = v
      state[".".join(parts[:-1] + ["bn", "num_batches_tracked"])] = np.array(0)
  assert convert.torch_name_to_flax("Conv2d_1a_3x3.conv.weight", np.zeros((32, 3, 3, 3)))[
      1].shape == (3, 3, 3, 32)
  out = convert.convert(state, str(tmp_path / "converted.npz"))
  with np.load(out) as data:
    for k, v in flat.items():
      np.testing.assert_array_equal(data[k], v)
  assert convert.torch_name_to_flax("AuxLogits.fc.weight", np.zeros((2, 2))) == (None, None)
  with pytest.raises(ValueError, match="unexpected entry 'Mixed_5b.branch1x1.conv.bias'"):
    convert.torch_name_to_flax("Mixed_5b.branch1x1.conv.bias", np.zeros(2))


def test_avg_pool_excludes_padding():
  x = jnp.ones((1, 4, 4, 1))
  np.testing.assert_allclose(inception.avg_pool_exclude_pad(x), 1.0)  # Corners too.


def test_inception_score_probabilities_leave_out_the_fc_bias(tmp_path, weights):
  """IS uses softmax(pool3 @ fc/kernel) without fc/bias (openai's IS code, torch-fidelity's
  logits_unbiased); FID's pool3 features are the same whatever the bias."""
  with np.load(weights) as data:
    flat = {k: data[k] for k in data.files}
  bias = np.random.default_rng(0).normal(0, 5, flat["fc/bias"].shape).astype(np.float32)
  np.savez(tmp_path / "biased.npz", **dict(flat, **{"fc/bias": bias}))
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 28, 28, 1),
                                         minval=-1, maxval=1))
  feats, probs = feature_nets.load("inception", str(tmp_path / "biased.npz"))(images)
  plain_feats, plain_probs = feature_nets.load("inception", weights)(images)
  np.testing.assert_allclose(feats, plain_feats, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs, plain_probs, rtol=1e-4, atol=1e-7)
  expected = jax.nn.softmax(jnp.asarray(feats, jnp.float32) @ flat["fc/kernel"])
  np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("content", [b"", b"not an npz", "half"])
def test_unreadable_weights_are_a_value_error_saying_to_convert_again(tmp_path, weights,
                                                                      content):
  """An empty or cut-short file raised EOFError / BadZipFile from deep inside numpy."""
  path = str(tmp_path / "inception_fid.npz")
  if content == "half":
    with open(weights, "rb") as f:
      content = f.read()[:1 << 20]
  with open(path, "wb") as f:
    f.write(content)
  with pytest.raises(ValueError, match=r"inception_fid.npz \(\d+ bytes\) is not a readable "
                                       r".npz file.*re-run the conversion.*"
                                       r"convert_inception_weights --src that.pth --out"):
    feature_nets.load("inception", path)


def test_conversion_interrupted_leaves_no_half_file(tmp_path, monkeypatch):
  state = {"fc.weight": np.zeros((1008, 2048), np.float32)}

  def interrupted(file, **arrays):
    with open(file, "wb") as f:
      f.write(b"PK\x03\x04")
    raise KeyboardInterrupt
  monkeypatch.setattr(np, "savez", interrupted)
  with pytest.raises(KeyboardInterrupt):
    convert.convert(state, str(tmp_path / "out.npz"))
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("channels", [2, 4])
def test_images_of_other_channel_counts_are_refused(weights, channels):
  """jax.image.resize to 3 channels would interpolate 2 or 4 into 3 without a word."""
  net = feature_nets.load("inception", weights)
  with pytest.raises(ValueError, match=rf"takes images \[B, H, W, 1 or 3\], not shape "
                                       rf"\(2, 28, 28, {channels}\)"):
    net(np.zeros((2, 28, 28, channels), np.float32))
  with pytest.raises(ValueError, match=rf"feature_net: feature network 'inception' takes "
                                       rf"images of 1 or 3 channels, not 28x28x{channels}"):
    net.check_images((28, 28, channels), "feature_net")
  net.check_images((32, 32, 3), "feature_net")
  net.check_images((28, 28, 1), "feature_net")


def _products(lowered_text):
  return [line for line in lowered_text.splitlines()
          if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]


@pytest.mark.parametrize("kind", ["inception", "fmnist_classifier"])
def test_feature_networks_compute_in_float32_on_every_device(kind, weights, tmp_path):
  """Every convolution and matmul of a feature network asks for float32 products
  (HIGHEST): not the TF32 or bfloat16 passes XLA would use by default on GPUs and TPUs,
  which would move FID with the device."""
  if kind == "fmnist_classifier":
    params = fmnist_classifier.Classifier().init(
        jax.random.PRNGKey(0), jnp.zeros((1, *fmnist_classifier.IMAGE_SHAPE)))["params"]
    weights = str(tmp_path / "fmnist.npz")
    fmnist_classifier.save(params, weights, {})
  fn = {"inception": inception, "fmnist_classifier": fmnist_classifier}[kind].feature_fn(weights)
  products = _products(fn.lower(jnp.zeros((2, 28, 28, 1))).as_text())
  assert len(products) >= 5 and all(p.count("HIGHEST") == 2 for p in products), products[:3]
