"""Tests for mixer/preprocess.py: each op's shapes, value ranges and determinism under a seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mixer import preprocess, randaugment, steps


def _jpeg(h=60, w=80, seed=0):
  image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(image), image


def _run(spec, image, seed=(1, 2)):
  return preprocess.get_preprocess_fn(spec)({"image": image, "rng": tf.constant(seed, tf.int64)})["image"].numpy()


def test_decode_and_value_range():
  encoded, _ = _jpeg()
  out = _run("decode|value_range(-1, 1)", encoded)
  assert out.shape == (60, 80, 3) and out.dtype == np.float32
  assert -1.0 <= out.min() and out.max() <= 1.0
  ramp = tf.constant(np.array([0, 255], np.uint8).reshape(1, 2, 1))
  np.testing.assert_allclose(_run("value_range(-1, 1)", ramp).ravel(), [-1.0, 1.0])
  np.testing.assert_allclose(_run("value_range(0, 1)", ramp).ravel(), [0.0, 1.0])


@pytest.mark.parametrize("spec", ["decode|inception_crop(32)", "decode_jpeg_and_inception_crop(32)"])
def test_inception_crop_size_and_determinism(spec):
  encoded, _ = _jpeg()
  a, b, c = _run(spec, encoded, (1, 2)), _run(spec, encoded, (1, 2)), _run(spec, encoded, (3, 4))
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_fused_jpeg_crop_equals_decode_then_crop():
  encoded, _ = _jpeg(seed=3)
  # The same window of the same decoder's output (TensorFlow's libjpeg-turbo decodes the crop's blocks only).
  np.testing.assert_array_equal(_run("decode_jpeg_and_inception_crop(24)", encoded),
                                _run("decode|inception_crop(24)", encoded))


def test_flip_is_a_mirror_chosen_by_the_seed():
  image = tf.constant(np.arange(12, dtype=np.uint8).reshape(2, 6, 1))
  outs = [_run("flip_lr", image, (s, 0)) for s in range(16)]
  flipped = [np.array_equal(o, image.numpy()[:, ::-1]) for o in outs]
  kept = [np.array_equal(o, image.numpy()) for o in outs]
  assert all(f or k for f, k in zip(flipped, kept, strict=True))
  assert any(flipped) and any(kept)
  np.testing.assert_array_equal(_run("flip_lr", image, (5, 0)), _run("flip_lr", image, (5, 0)))


def test_resize_small_then_central_crop():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8))
  small = _run("resize_small(50)", image)
  assert small.shape == (50, 100, 3)
  marked = np.zeros((10, 20, 1), np.uint8)
  marked[3:7, 8:12] = 255
  crop = _run("central_crop(4)", tf.constant(marked))
  np.testing.assert_array_equal(crop, 255)


def test_resize_to_square():
  assert _run("resize(16)", tf.zeros((8, 8, 1), tf.uint8)).shape == (16, 16, 1)
  assert _run("resize((12, 20))", tf.zeros((8, 8, 3), tf.uint8)).shape == (12, 20, 3)


@pytest.mark.parametrize("spec,message", [("decode|rotate(3)", "rotate"), ("resize(x)", "literals"),
                                          ("resize(", "NAME")])
def test_bad_pipeline_strings_name_the_op(spec, message):
  with pytest.raises(ValueError, match=message):
    preprocess.get_preprocess_fn(spec)


def test_random_op_in_an_eval_pipeline_and_a_too_small_crop_are_named():
  image = tf.io.encode_png(np.zeros((20, 30, 3), np.uint8))
  for spec in ("decode|flip_lr", "decode | flip_lr ()"):
    with pytest.raises(ValueError, match=r"preprocessing op flip_lr ?(\(\))? is random.*config.pp_eval"):
      preprocess.get_preprocess_fn(spec)({"image": image})
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"central_crop\(24\) got an image smaller than 24x24"):
    preprocess.get_preprocess_fn("decode|central_crop(24)")({"image": image})
  crop = tf.data.Dataset.from_tensors({"image": image}).map(preprocess.get_preprocess_fn("decode|central_crop(24)"))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"central_crop\(24\)"):
    next(iter(crop))
  assert preprocess.get_preprocess_fn("decode|central_crop(16)")({"image": image})["image"].shape == (16, 16, 3)


def test_randaugment_keeps_shape_and_dtype_and_follows_the_seed():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
  outs = {seed: _run("randaugment(2, 15)", image, (seed, 0)) for seed in range(8)}
  for out in outs.values():
    assert out.shape == (48, 40, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(_run("randaugment(2, 15)", image, (3, 0)), outs[3])
  assert len({o.tobytes() for o in outs.values()}) > 4  # different seeds, different augmentations.
  assert any(not np.array_equal(o, image.numpy()) for o in outs.values())


def test_randaugment_applies_every_layer():
  # As the reference, each of the 2 layers always applies its op: on noise, only solarize at magnitude 15
  # (threshold above 255) leaves the image as it was, so about 1/16^2 of draws are unchanged (gating each
  # layer with a probability in [0.2, 0.8] left about 28% unchanged).
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
  augment = tf.function(lambda seed: randaugment.randaugment(image, 2, 15, seed))
  unchanged = sum(np.array_equal(augment(tf.constant([seed, 1])).numpy(), image.numpy()) for seed in range(200))
  assert unchanged <= 10


@pytest.mark.parametrize("index", range(randaugment.NUM_OPS))
def test_each_randaugment_op_keeps_uint8_shape(index):
  image = tf.constant(np.random.default_rng(index).integers(0, 256, (24, 32, 3), dtype=np.uint8))
  op = randaugment._ops(tf.constant(10.0), tf.constant(1.0), tf.constant([4, 5]))[index]
  out = op(image).numpy()
  assert out.shape == (24, 32, 3) and out.dtype == np.uint8


def test_randaugment_ops_do_what_they_say():
  ramp = tf.constant(np.tile(np.arange(64, 192, 4, dtype=np.uint8)[None, :, None], (8, 1, 3)))
  np.testing.assert_array_equal(randaugment.invert(ramp, None).numpy(), 255 - ramp.numpy())
  stretched = randaugment.autocontrast(ramp, None).numpy()
  assert stretched.min() == 0 and stretched.max() == 255
  assert randaugment.brightness(ramp, tf.constant(0.0)).numpy().max() <= 26  # factor 0.1 of the ramp
  rotated = randaugment.rotate(ramp, tf.constant(180.0)).numpy()
  np.testing.assert_array_equal(rotated, ramp.numpy()[::-1, ::-1])
  shifted = randaugment.translate_x(ramp, tf.constant(2.0)).numpy()
  np.testing.assert_array_equal(shifted[:, 2:], ramp.numpy()[:, :-2])
  assert np.all(shifted[:, :2] == 128)
  with pytest.raises(ValueError, match="uint8"):
    randaugment.randaugment(tf.zeros((4, 4, 3)), 2, 10, tf.constant([0, 0], tf.int64))


def test_mixup_mixes_images_and_targets_with_one_weight():
  images = jax.random.normal(jax.random.key(0), (6, 4, 4, 3))
  labels = jnp.arange(6) % 3
  targets = jax.nn.one_hot(labels, 3)
  mixed, mixed_targets = steps.mixup(jax.random.key(1), images, labels, 3, 0.5)
  np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)  # label sums stay 1.
  a = float(mixed_targets[1, 1])  # example 1 (class 1) mixed with example 0 (class 0).
  assert 0.5 <= a <= 1.0
  np.testing.assert_allclose(mixed, a * images + (1 - a) * jnp.roll(images, 1, axis=0), rtol=1e-5, atol=1e-6)
  # The neighbour's targets come from its rolled labels: equal to rolling the targets.
  np.testing.assert_array_equal(mixed_targets, a * targets + (1 - a) * jnp.roll(targets, 1, axis=0))
  multi = jnp.array([[0, 2], [1, -1], [2, -1], [0, 1], [1, 2], [2, 0]])  # multi-label, -1 = none
  _, mixed_multi = steps.mixup(jax.random.key(1), images, multi, 3, 0.5)
  multi_hot = steps.to_targets(multi, 3)
  np.testing.assert_array_equal(mixed_multi, a * multi_hot + (1 - a) * jnp.roll(multi_hot, 1, axis=0))
  again, _ = steps.mixup(jax.random.key(1), images, labels, 3, 0.5)
  np.testing.assert_array_equal(again, mixed)
  other, _ = steps.mixup(jax.random.key(2), images, labels, 3, 0.5)
  assert not np.allclose(other, mixed)


def test_patch_shuffle_moves_whole_patches_with_one_pixel_permutation():
  image = tf.constant(np.arange(96, dtype=np.uint8).reshape(8, 12, 1))  # every pixel value unique
  out = _run("patch_shuffle(4, seed=1)", image)
  np.testing.assert_array_equal(out, _run("patch_shuffle(4, seed=1)", image, (7, 7)))  # fixed for all images
  assert not np.array_equal(out, image.numpy())

  def patches(x):
    return x.reshape(2, 4, 3, 4).transpose(0, 2, 1, 3).reshape(6, 16)
  source, shuffled = patches(image.numpy()), patches(out)
  where = {int(v): (i, j) for i in range(6) for j, v in enumerate(source[i])}
  sources = [{where[int(v)][0] for v in row} for row in shuffled]
  assert all(len(s) == 1 for s in sources)  # each output patch is one whole input patch
  assert sorted(s.pop() for s in sources) == list(range(6))
  pixel_orders = {tuple(where[int(v)][1] for v in row) for row in shuffled}
  assert len(pixel_orders) == 1 and pixel_orders != {tuple(range(16))}  # one shared, non-trivial permutation


def test_pixel_shuffle_is_one_fixed_permutation_of_all_pixels():
  image = tf.constant(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
  out = _run("pixel_shuffle(seed=2)", image)
  np.testing.assert_array_equal(out, _run("pixel_shuffle(seed=2)", image, (9, 9)))  # no per-example randomness
  assert sorted(out.reshape(-1, 3).tolist()) == sorted(image.numpy().reshape(-1, 3).tolist())  # pixels kept whole
  assert not np.array_equal(out, image.numpy())
