"""RandAugment (Cubuk et al. 2020) on uint8 images, stateless: the standard op set of the reference TPU
implementation that the paper's (big_vision / vision_transformer) pipelines used, with its magnitude
scale (level / 10 of each op's range; the paper uses magnitudes 10, 15 and 20)."""

import math

import tensorflow as tf

_MAX_LEVEL = 10.0
_FILL = 128  # affine ops and cutout fill with grey, as the reference.
_TRANSLATE_PIXELS = 100
_CUTOUT_PIXELS = 40


def _blend(image, degenerate, factor):
  """degenerate + factor * (image - degenerate), clipped to [0, 255], as PIL's ImageEnhance: factor 0 gives
  degenerate, 1 the image, above 1 extrapolates away from degenerate."""
  image, degenerate = tf.cast(image, tf.float32), tf.cast(degenerate, tf.float32)
  return tf.cast(tf.clip_by_value(degenerate + factor * (image - degenerate), 0, 255), tf.uint8)


def _grayscale(image):
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)) if image.shape[-1] == 3 else image


def autocontrast(image, _):
  def channel(c):
    lo, hi = tf.cast(tf.reduce_min(c), tf.float32), tf.cast(tf.reduce_max(c), tf.float32)
    scaled = (tf.cast(c, tf.float32) - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
    return tf.where(hi > lo, tf.cast(tf.clip_by_value(scaled, 0, 255), tf.uint8), c)
  return tf.stack([channel(image[..., i]) for i in range(image.shape[-1])], -1)


def equalize(image, _):
  def channel(c):
    hist = tf.histogram_fixed_width(tf.cast(c, tf.int32), [0, 255], nbins=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = tf.clip_by_value((tf.cumsum(hist) + step // 2) // tf.maximum(step, 1), 0, 255)
    lut = tf.concat([[0], lut[:-1]], 0)
    return tf.where(step > 0, tf.cast(tf.gather(lut, tf.cast(c, tf.int32)), tf.uint8), c)
  return tf.stack([channel(image[..., i]) for i in range(image.shape[-1])], -1)


def invert(image, _):
  return 255 - image


def posterize(image, level):
  shift = tf.cast(8 - tf.cast(level / _MAX_LEVEL * 4, tf.int32), tf.uint8)
  shift = tf.clip_by_value(shift, 0, 7)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, level):
  threshold = tf.cast(level / _MAX_LEVEL * 256, tf.int32)
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, level):
  added = tf.clip_by_value(tf.cast(image, tf.int32) + tf.cast(level / _MAX_LEVEL * 110, tf.int32), 0, 255)
  return tf.where(image < 128, tf.cast(added, tf.uint8), image)


def _factor(level):
  return level / _MAX_LEVEL * 1.8 + 0.1


def color(image, level):
  return _blend(image, _grayscale(image), _factor(level))


def contrast(image, level):
  mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image) if image.shape[-1] == 3 else image, tf.float32))
  return _blend(image, tf.fill(tf.shape(image), tf.cast(mean, tf.uint8)), _factor(level))


def brightness(image, level):
  return _blend(image, tf.zeros_like(image), _factor(level))


def sharpness(image, level):
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior > 0, tf.round(smooth), tf.cast(image, tf.float32))  # borders stay.
  return _blend(image, degenerate, _factor(level))


def _transform(image, matrix):
  """Applies a 3x3 output->input projective map, filling outside pixels with grey."""
  transform = tf.reshape(matrix, [9])[:8][None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(transform, tf.float32), output_shape=tf.shape(image)[:2],
      fill_value=float(_FILL), interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def rotate(image, degrees):
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  a = degrees * math.pi / 180
  cos, sin = tf.cos(a), tf.sin(a)
  # Rotation about the image centre, written as the map from output to input coordinates.
  x0 = (w - 1) / 2 - cos * (w - 1) / 2 + sin * (h - 1) / 2
  y0 = (h - 1) / 2 - sin * (w - 1) / 2 - cos * (h - 1) / 2
  return _transform(image, tf.stack([cos, -sin, x0, sin, cos, y0, 0.0, 0.0, 1.0]))


def shear_x(image, amount):
  return _transform(image, tf.stack([1.0, amount, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]))


def shear_y(image, amount):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, amount, 1.0, 0.0, 0.0, 0.0, 1.0]))


def translate_x(image, pixels):
  return _transform(image, tf.stack([1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]))


def translate_y(image, pixels):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0, 1.0]))


def cutout(image, size, center):
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  cy, cx = center[0] % h, center[1] % w
  ys, xs = tf.range(h)[:, None], tf.range(w)[None, :]
  inside = (tf.abs(ys - cy) <= size) & (tf.abs(xs - cx) <= size)
  return tf.where(inside[..., None], tf.cast(_FILL, image.dtype), image)


def _ops(level, sign, center):
  """The 16 ops of the reference implementation, each a function of the image only."""
  signed = lambda x: x * sign
  return [
      lambda im: autocontrast(im, level),
      lambda im: equalize(im, level),
      lambda im: invert(im, level),
      lambda im: rotate(im, signed(level / _MAX_LEVEL * 30.0)),
      lambda im: posterize(im, level),
      lambda im: solarize(im, level),
      lambda im: color(im, level),
      lambda im: contrast(im, level),
      lambda im: brightness(im, level),
      lambda im: sharpness(im, level),
      lambda im: shear_x(im, signed(level / _MAX_LEVEL * 0.3)),
      lambda im: shear_y(im, signed(level / _MAX_LEVEL * 0.3)),
      lambda im: translate_x(im, signed(level / _MAX_LEVEL * _TRANSLATE_PIXELS)),
      lambda im: translate_y(im, signed(level / _MAX_LEVEL * _TRANSLATE_PIXELS)),
      lambda im: cutout(im, tf.cast(level / _MAX_LEVEL * _CUTOUT_PIXELS, tf.int32), center),
      lambda im: solarize_add(im, level),
  ]


NUM_OPS = 16


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
  """Applies `num_layers` ops drawn uniformly from the 16, each one always (as the reference: it draws a
  probability per op but never uses it)."""
  if image.dtype != tf.uint8:
    raise ValueError(f"randaugment takes uint8 images (put it before value_range), got {image.dtype}")
  seeds = tf.random.experimental.stateless_split(seed, num=3 * num_layers)
  level = tf.constant(float(magnitude))
  for i in range(num_layers):
    s_op, s_sign, s_center = (seeds[3 * i + k] for k in range(3))
    index = tf.random.stateless_uniform([], s_op, 0, NUM_OPS, tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    center = tf.random.stateless_uniform([2], s_center, 0, 2**30, tf.int32)
    branches = [lambda op=op, im=image: tf.ensure_shape(op(im), im.shape) for op in _ops(level, sign, center)]
    image = tf.switch_case(index, branches)
  return image
