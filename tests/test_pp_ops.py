"""Tests for big_vision/pp: the op-string parser and every registered op.

Ops run inside `tf.data.Dataset.map` (graph mode), as in the input pipeline.
"""
import numpy as np
import pytest
import tensorflow as tf

from big_vision.pp import get_preprocess_fn, registered_ops
from big_vision.pp import registry

SEED = np.array([3, 7], np.int64)


def run(pp: str, data: dict) -> dict:
  """Applies `pp` to one example through tf.data; returns numpy values."""
  ds = tf.data.Dataset.from_tensors(data).map(get_preprocess_fn(pp))
  return {k: v.numpy() for k, v in next(iter(ds)).items()}


def unique_image(h=8, w=10) -> np.ndarray:
  """float32 [h, w, 1] whose pixel (r, c) holds r * 100 + c."""
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return (r * 100 + c).astype(np.float32)[..., None]


def window_of(crop: np.ndarray, image: np.ndarray) -> tuple[int, int]:
  """Asserts `crop` is a contiguous window of `unique_image`; returns corner."""
  top, left = divmod(int(crop[0, 0, 0]), 100)
  h, w = crop.shape[:2]
  np.testing.assert_array_equal(crop, image[top:top + h, left:left + w])
  return top, left


# --- Parser and registry. ---------------------------------------------------


def test_parse_op_spec_literals():
  assert registry.parse_op_spec("flip_lr") == ("flip_lr", (), {})
  name, args, kwargs = registry.parse_op_spec(
      'f(1, (2, 3), -1.5, key="x", names=["a", "b"], flag=None)')
  assert (name, args) == ("f", (1, (2, 3), -1.5))
  assert kwargs == {"key": "x", "names": ["a", "b"], "flag": None}


def test_split_respects_quotes_and_brackets():
  specs = registry.split_pp_string('keep("a|b", "c")|resize((1, 2))| flip_lr ')
  assert specs == ['keep("a|b", "c")', "resize((1, 2))", "flip_lr"]
  with pytest.raises(ValueError, match="Empty op"):
    registry.split_pp_string("decode||flip_lr")


@pytest.mark.parametrize("spec", ['resize(__import__("os").getcwd())',
                                  "resize(size)", "resize(2 ** 3)"])
def test_non_literal_arguments_are_rejected(spec):
  with pytest.raises(ValueError, match="not a Python literal"):
    get_preprocess_fn(spec)


def test_unknown_op_names_it_and_lists_registered_ops():
  with pytest.raises(ValueError) as e:
    get_preprocess_fn("decode|rezise(64)")
  msg = str(e.value)
  assert "'rezise'" in msg and "resize" in msg and "value_range" in msg


def test_bad_arguments_name_the_op():
  with pytest.raises(ValueError, match=r"resize\(1, 2, 3, 4, 5\)"):
    get_preprocess_fn("resize(1, 2, 3, 4, 5)")
  with pytest.raises(ValueError, match="size=-3"):
    get_preprocess_fn("resize(-3)")


def test_registered_ops_include_the_documented_ones():
  expected = {"decode", "resize", "resize_small", "central_crop",
              "inception_crop", "decode_jpeg_and_inception_crop", "flip_lr",
              "value_range", "keep", "drop", "copy", "onehot", "pad_to_size",
              "pad", "grayscale_to_rgb", "to_rgb", "rgb_to_grayscale"}
  assert expected <= set(registered_ops())


def test_empty_pp_string_is_identity():
  out = run("", {"x": np.arange(3)})
  np.testing.assert_array_equal(out["x"], [0, 1, 2])


# --- Image ops. -------------------------------------------------------------


def test_decode_png_and_pass_through():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  png = tf.io.encode_png(rgb).numpy()
  np.testing.assert_array_equal(run("decode", {"image": png})["image"], rgb)
  # Already-decoded images are returned unchanged.
  np.testing.assert_array_equal(run("decode", {"image": rgb})["image"], rgb)
  # A grayscale PNG decoded with channels=3 repeats the channel.
  gray = rgb[..., :1]
  out = run("decode(3)", {"image": tf.io.encode_png(gray).numpy()})["image"]
  np.testing.assert_array_equal(out, np.repeat(gray, 3, axis=-1))
  out = run("decode(channels=1)", {"image": tf.io.encode_png(gray).numpy()})
  np.testing.assert_array_equal(out["image"], gray)


def test_image_ops_reject_encoded_images():
  png = tf.io.encode_png(np.zeros((2, 2, 1), np.uint8)).numpy()
  with pytest.raises(ValueError, match="resize: 'image' is still an encoded"):
    run("resize(4)", {"image": png})


def test_resize_area_averages_blocks_and_keeps_dtype():
  image = np.array([[0, 10, 20, 30], [10, 20, 30, 40],
                    [100, 100, 7, 9], [100, 100, 9, 11]], np.uint8)[..., None]
  out = run('resize(2, method="area")', {"image": image})["image"]
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], [[10, 30], [100, 9]])
  # (height, width) form, nearest neighbour upsampling.
  out = run('resize((4, 2), method="nearest")', {"image": image[:2, :2]})
  np.testing.assert_array_equal(out["image"][..., 0],
                                [[0, 10], [0, 10], [10, 20], [10, 20]])


def test_resize_rounds_instead_of_truncating():
  image = np.array([[0, 3]], np.uint8)[..., None]
  out = run("resize((1, 4))", {"image": image})["image"]
  # Bilinear (half-pixel centres) gives 0, 0.75, 2.25, 3; truncating would
  # give 0, 0, 2, 3.
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 2, 3])


def test_resize_small_keeps_aspect_ratio():
  blocks = np.arange(20, dtype=np.uint8).reshape(2, 10)  # 2x10 blocks...
  image = np.kron(blocks, np.ones((3, 3), np.uint8))[..., None]  # ...of 3x3.
  out = run("resize_small(2)", {"image": image})["image"]
  assert out.shape == (2, 10, 1)
  np.testing.assert_array_equal(out[..., 0], blocks)
  tall = run("resize_small(4)", {"image": np.zeros((20, 8, 3), np.uint8)})
  assert tall["image"].shape == (10, 4, 3)


def test_central_crop():
  image = unique_image(6, 8)
  out = run("central_crop((2, 4))", {"image": image})["image"]
  np.testing.assert_array_equal(out, image[2:4, 2:6])
  np.testing.assert_array_equal(run("central_crop(3)", {"image": image})["image"],
                                image[1:4, 2:5])


def test_central_crop_larger_than_image_fails():
  with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than"):
    run("central_crop(9)", {"image": unique_image(6, 8)})


def test_inception_crop_is_a_seeded_window_of_valid_area():
  image = unique_image(40, 50)
  corners = set()
  for i in range(12):
    seed = np.array([i, 1], np.int64)
    out = run("inception_crop(area_min=20, area_max=60)",
              {"image": image, "_seed": seed})["image"]
    corners.add(window_of(out, image))
    area = out.shape[0] * out.shape[1] / (40 * 50)
    assert 0.2 - 0.02 <= area <= 0.6 + 0.02  # Pixel rounding.
    again = run("inception_crop(area_min=20, area_max=60)",
                {"image": image, "_seed": seed})["image"]
    np.testing.assert_array_equal(out, again)  # Same seed, same crop.
  assert len(corners) > 3  # Different seeds, different crops.


def test_inception_crop_full_area_and_resize():
  image = np.full((12, 12, 3), 77, np.uint8)
  out = run("inception_crop(6, area_min=100, ratio_min=1, ratio_max=1)",
            {"image": image, "_seed": SEED})["image"]
  assert out.shape == (6, 6, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, 77)


def test_inception_crop_rejects_bad_area():
  with pytest.raises(ValueError, match="area_min=50, area_max=10"):
    get_preprocess_fn("inception_crop(area_min=50, area_max=10)")


def test_decode_jpeg_and_inception_crop():
  image = np.zeros((30, 40, 3), np.uint8)
  image[..., 0], image[..., 1], image[..., 2] = 200, 100, 50
  for encode in (tf.io.encode_png, tf.io.encode_jpeg):
    out = run("decode_jpeg_and_inception_crop(16)",
              {"image": encode(image).numpy(), "_seed": SEED})["image"]
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # JPEG is lossy but a flat colour survives almost exactly.
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), [200, 100, 50],
                               atol=2)


def test_random_crop_is_a_seeded_window():
  image = unique_image(10, 10)
  corners = set()
  for i in range(10):
    out = run("random_crop(6)", {"image": image, "_seed": np.array([i, 0])})
    assert out["image"].shape == (6, 6, 1)
    corners.add(window_of(out["image"], image))
  assert len(corners) > 3


def test_flip_lr_flips_about_half_the_time_deterministically():
  image = unique_image(3, 5)
  flipped = 0
  for i in range(40):
    data = {"image": image, "_seed": np.array([i, 5], np.int64)}
    out = run("flip_lr", data)["image"]
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(run("flip_lr", data)["image"], out)
  assert 8 <= flipped <= 32


def test_random_ops_advance_the_seed():
  # Two flips in a row must not use the same seed (else they always cancel).
  image = unique_image(3, 5)
  outcomes = {np.array_equal(run("flip_lr|flip_lr",
                                 {"image": image, "_seed": np.array([i, 0])}
                                 )["image"], image) for i in range(20)}
  assert outcomes == {True, False}


def test_random_ops_without_seed_still_vary():
  image = unique_image(3, 5)
  ds = tf.data.Dataset.from_tensors({"image": image}).repeat(30)
  ds = ds.map(get_preprocess_fn("flip_lr"))
  outs = {x["image"][0, 0, 0] for x in ds.as_numpy_iterator()}
  assert outs == {0.0, 4.0}


def test_value_range():
  image = np.array([0, 51, 255], np.uint8).reshape(1, 3, 1)
  out = run("value_range(-1, 1)", {"image": image})["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out.ravel(), [-1, -0.6, 1], atol=1e-6)
  out = run("value_range(0, 1, in_min=0, in_max=51, clip_values=True)",
            {"image": image})["image"]
  np.testing.assert_allclose(out.ravel(), [0, 1, 1])


def test_standardize():
  image = np.array([[[10, 20, 30]]], np.uint8)
  out = run("standardize((10, 10, 10), (1, 2, 4))", {"image": image})["image"]
  np.testing.assert_allclose(out.ravel(), [0, 5, 5])


@pytest.mark.parametrize("op", ["pad(32)", "pad_to_size(32)",
                                "pad_to_size((32, 32))"])
def test_pad_centres_28_in_32(op):
  image = np.ones((28, 28, 1), np.uint8) * 9
  out = run(op, {"image": image})["image"]
  assert out.shape == (32, 32, 1) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[2:30, 2:30], image)
  assert out.sum() == image.sum()  # Everything else is zero.


def test_pad_odd_amount_and_value():
  out = run("pad((4, 5), value=7)", {"image": np.zeros((1, 2, 1), np.int32)})
  expected = np.full((4, 5), 7)
  expected[1, 1:3] = 0  # top=(4-1)//2=1, left=(5-2)//2=1.
  np.testing.assert_array_equal(out["image"][..., 0], expected)


def test_pad_smaller_target_fails():
  with pytest.raises(ValueError, match="larger than"):  # Static shape.
    run("pad(4)", {"image": np.zeros((5, 5, 1), np.uint8)})
  ds = tf.data.Dataset.from_generator(  # Shape only known at run time.
      lambda: iter([{"image": np.zeros((5, 5, 1), np.uint8)}]),
      output_signature={"image": tf.TensorSpec([None, None, 1], tf.uint8)})
  with pytest.raises(tf.errors.InvalidArgumentError, match="larger than"):
    next(iter(ds.map(get_preprocess_fn("pad(4)"))))


@pytest.mark.parametrize("op", ["grayscale_to_rgb", "to_rgb"])
def test_grayscale_to_rgb(op):
  gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  out = run(op, {"image": gray})["image"]
  assert out.shape == (2, 3, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray[..., 0])
  rgb = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
  np.testing.assert_array_equal(run(op, {"image": rgb})["image"], rgb)


def test_rgb_to_grayscale():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 10, 10]]],
                 np.uint8)
  out = run("rgb_to_grayscale", {"image": rgb})["image"]
  assert out.shape == (1, 4, 1) and out.dtype == np.uint8
  # ITU-R 601 luma: 0.2989 R + 0.5870 G + 0.1140 B.
  np.testing.assert_array_equal(out.ravel(), [76, 150, 29, 10])


def test_fashion_mnist_style_pipeline():
  image = np.arange(28 * 28, dtype=np.int32).reshape(28, 28, 1) % 256
  out = run('decode|pad(32)|to_rgb|value_range(0, 1)|onehot(10, key_result='
            '"labels")|keep("image", "labels")',
            {"image": image.astype(np.uint8), "label": np.int64(4)})
  assert sorted(out) == ["image", "labels"]
  assert out["image"].shape == (32, 32, 3)
  np.testing.assert_allclose(out["image"][2:30, 2:30, 1], image[..., 0] / 255,
                             rtol=1e-6)
  np.testing.assert_array_equal(out["labels"], np.eye(10)[4])


# --- General ops. -----------------------------------------------------------


def test_keep_and_drop():
  data = {"image": np.zeros(2), "label": np.int64(1), "extra": np.ones(1)}
  assert sorted(run('keep("image", "label")', data)) == ["image", "label"]
  assert sorted(run('drop("extra")', data)) == ["image", "label"]
  with pytest.raises(KeyError, match="labels"):
    run('keep("image", "labels")', data)
  with pytest.raises(KeyError, match="nope"):
    run('drop("nope")', data)


def test_copy_and_rename():
  data = {"a": np.array([1, 2]), "b": np.int64(5)}
  out = run('copy("a", "c")', data)
  np.testing.assert_array_equal(out["c"], [1, 2])
  np.testing.assert_array_equal(out["a"], [1, 2])
  out = run('rename("a", "z")', data)
  assert sorted(out) == ["b", "z"]
  np.testing.assert_array_equal(out["z"], [1, 2])


def test_onehot():
  out = run("onehot(5)", {"label": np.int64(3)})
  np.testing.assert_array_equal(out["label"], [0, 0, 0, 1, 0])
  out = run('onehot(4, key="y", key_result="y1", on=0.9, off=0.1)',
            {"y": np.int32(0)})
  np.testing.assert_allclose(out["y1"], [0.9, 0.1, 0.1, 0.1])
  np.testing.assert_array_equal(out["y"], 0)  # Input kept.
  out = run("onehot(5)", {"label": np.array([0, 2, 2], np.int64)})
  np.testing.assert_array_equal(out["label"], [1, 0, 1, 0, 0])
  out = run("onehot(3)", {"label": np.zeros([0], np.int64)})
  np.testing.assert_array_equal(out["label"], [0, 0, 0])


@pytest.mark.parametrize("spec", ["resize(8, method='bilinnear')",
                                  "resize_small(8, method='cubic')",
                                  "inception_crop(8, method='lanczos')"])
def test_unknown_resize_method_is_clear_when_the_op_is_built(spec):
  # Not deep inside tf.data at the first batch: the op's constructor names the method.
  with pytest.raises(ValueError, match=r"method='\w+' is not a resize method; known: bilinear"):
    get_preprocess_fn(spec)
